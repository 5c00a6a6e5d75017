"""engine/sampling.py against plain-Python references: penalties, min-p, logprobs, the draw itself."""
import math

import numpy as np
import pytest

from engine.sampling import Sampler, SamplingParams, log_softmax, token_logprob


def ref_penalized(logits, history, window, rep, pres, freq):
    out = [float(x) for x in logits]
    recent = history[-window:] if window else []
    for t in set(recent):
        if rep != 1.0:
            out[t] = out[t] / rep if out[t] > 0 else out[t] * rep
        c = recent.count(t)
        out[t] -= pres + freq * c
    return out


@pytest.mark.parametrize("rep,pres,freq", [(1.3, 0.0, 0.0), (1.0, 0.7, 0.0), (1.0, 0.0, 0.4),
                                           (1.2, -0.5, 1.5)])
def test_penalties_match_reference(rep, pres, freq):
    rng = np.random.default_rng(0)
    logits = rng.standard_normal(50).astype(np.float32) * 3
    history = [int(x) for x in rng.integers(0, 50, 90)]
    s = Sampler(SamplingParams(repeat_penalty=rep, presence_penalty=pres, frequency_penalty=freq, repeat_window=64))
    got = s.penalized(logits, history)
    np.testing.assert_allclose(got, ref_penalized(logits, history, 64, rep, pres, freq), rtol=0, atol=1e-12)
    # greedy takes the argmax of the penalized logits
    assert s(logits, history) == int(np.argmax(ref_penalized(logits, history, 64, rep, pres, freq)))


def test_penalties_off_leave_logits_alone():
    logits = np.arange(10, dtype=np.float32)
    s = Sampler(SamplingParams())
    assert np.array_equal(s.penalized(logits, [9, 9, 9]), logits)


def test_greedy_is_the_first_largest_logit():
    # the greedy path without penalties skips the float64 copy: its choice must not change, ties included
    rng = np.random.default_rng(3)
    for _ in range(20):
        logits = rng.integers(-4, 5, 300).astype(np.float32) * np.float32(0.25)
        best = max(range(len(logits)), key=lambda i: (float(logits[i]), -i))   # first of the largest
        for given in (logits, logits.astype(np.float64), [float(x) for x in logits]):
            assert Sampler(SamplingParams())(given, [1, 2]) == best
            assert Sampler(SamplingParams(repeat_window=0, repeat_penalty=1.5))(given, [1, 2]) == best


def test_frequency_penalty_changes_greedy_choice():
    logits = np.array([5.0, 4.9, 0.0])
    s = Sampler(SamplingParams(frequency_penalty=0.2))
    assert s(logits, []) == 0
    assert s(logits, [0]) == 1           # 5.0 - 0.2 < 4.9


def ref_probs(logits, temp, top_k, top_p, min_p):
    z = [x / temp for x in logits]
    if top_k:
        kth = sorted(z, reverse=True)[top_k - 1]
        z = [x if x >= kth else -math.inf for x in z]
    m = max(z)
    e = [math.exp(x - m) for x in z]
    s = sum(e)
    p = [x / s for x in e]
    if top_p < 1:
        order = sorted(range(len(p)), key=lambda i: -p[i])
        keep, acc = set(), 0.0
        for i in order:
            keep.add(i)
            acc += p[i]
            if acc >= top_p:
                break
        p = [x if i in keep else 0.0 for i, x in enumerate(p)]
        s = sum(p)
        p = [x / s for x in p]
    if min_p > 0:
        mx = max(p)
        p = [x if x >= min_p * mx else 0.0 for x in p]
        s = sum(p)
        p = [x / s for x in p]
    return p


@pytest.mark.parametrize("temp,top_k,top_p,min_p", [(1.0, 0, 1.0, 0.1), (0.7, 5, 1.0, 0.0),
                                                    (1.3, 0, 0.8, 0.05), (1.0, 8, 0.9, 0.2)])
def test_distribution_matches_reference(temp, top_k, top_p, min_p):
    rng = np.random.default_rng(1)
    logits = rng.standard_normal(20) * 2
    s = Sampler(SamplingParams(temperature=temp, top_k=top_k, top_p=top_p, min_p=min_p, seed=5))
    ref = np.array(ref_probs(list(logits), temp, top_k, top_p, min_p))
    np.testing.assert_allclose(s.probs(logits), ref, atol=1e-12)
    # the draws follow it: 4000 draws, each frequency within 5 sigma, never a removed token
    n = 4000
    counts = np.bincount([s(logits, []) for _ in range(n)], minlength=20)
    assert np.all(counts[ref == 0] == 0)
    sigma = np.sqrt(n * ref * (1 - ref)) + 1
    assert np.all(np.abs(counts - n * ref) <= 5 * sigma)


def test_min_p_keeps_tokens_near_the_best():
    logits = np.log(np.array([0.5, 0.3, 0.15, 0.05]))
    p = Sampler(SamplingParams(temperature=1.0, min_p=0.5)).probs(logits)
    np.testing.assert_allclose(p, [0.5 / 0.8, 0.3 / 0.8, 0, 0], atol=1e-12)


def test_same_seed_same_draws():
    logits = np.random.default_rng(2).standard_normal(100)
    a = Sampler(SamplingParams(temperature=1.0, seed=42))
    b = Sampler(SamplingParams(temperature=1.0, seed=42))
    assert [a(logits, []) for _ in range(50)] == [b(logits, []) for _ in range(50)]


def test_logprobs_match_reference():
    logits = np.random.default_rng(3).standard_normal(30).astype(np.float32) * 4
    lse = math.log(sum(math.exp(float(x)) for x in logits))
    ref = [float(x) - lse for x in logits]
    e = token_logprob(logits, 7, top=5)
    assert e.id == 7 and abs(e.logprob - ref[7]) < 1e-9
    best = sorted(range(30), key=lambda i: -ref[i])[:5]
    assert [i for i, _ in e.top] == best
    assert all(abs(lp - ref[i]) < 1e-9 for i, lp in e.top)
    assert abs(np.exp(log_softmax(logits)).sum() - 1) < 1e-12


def test_step_reports_the_model_logprob_not_the_penalized_one():
    logits = np.array([3.0, 1.0, 0.0])
    s = Sampler(SamplingParams(presence_penalty=2.0))
    tok, lp = s.step(logits, [0], logprobs=0)
    assert tok == 0 and lp.top == []
    assert abs(lp.logprob - log_softmax(logits)[0]) < 1e-12
    assert s.step(logits, [0])[1] is None


@pytest.mark.parametrize("kw", [dict(min_p=1.5), dict(min_p=-0.1), dict(presence_penalty=2.5),
                                dict(frequency_penalty=-3), dict(repeat_window=-1)])
def test_bad_parameters_are_refused(kw):
    with pytest.raises(ValueError, match=next(iter(kw))):
        SamplingParams(**kw)


@pytest.mark.parametrize("field,value", [("temperature", float("nan")), ("temperature", float("inf")),
                                         ("top_p", float("nan")), ("repeat_penalty", float("inf")),
                                         ("min_p", float("nan")), ("presence_penalty", float("-inf"))])
def test_non_finite_sampling_values_are_refused_by_name(field, value):
    with pytest.raises(ValueError, match=field):
        SamplingParams(**{field: value})
