"""abits "q8" (runtime/act_q8.py, kernels_int8.c q8_*): activations rounded to llama.cpp's 8-bit grid.

References, independent of the code under test: a scalar transcription of llama.cpp's two rules written
here (ggml-cpu's x86 quantize_row_q8_0 and quantize_row_q8_K_ref, one block at a time in float32 scalars),
the gguf package's Q8_0 quantizer (llama.cpp's scalar reference rule, which rounds ties away from zero and
multiplies by 1/d: equal but for lanes a hair from a half), float64 NumPy products of the dequantized
weights, and (slow) llama.cpp's own quantizers called in its library and llama.cpp's logits on random
models quantized by llama.cpp itself.
"""
import json
import subprocess
from math import gcd

import numpy as np
import pytest

from loader.bipolar import PackedLinear, quantize_weights
from loader.precision import check_abits, parse_abits
from runtime.act_q8 import block_for_type, q8_round, q8_values
from runtime.cpu import CpuBackend, a16_block, available_isas, build
from runtime.cpu import backend as cpu_backend

ISAS = available_isas()
F = np.float32


def ref_block(x: np.ndarray, ar: int) -> tuple[list[int], float]:
    """One block (float32 values, zero-padded to ar lanes) by llama.cpp's rule, as written in its source:
    (q, d) with the value of lane k being d * q[k]."""
    if ar == 32:                                    # x86 quantize_row_q8_0
        amax = F(0)
        for v in x:
            amax = max(amax, abs(v))
        d = float(np.float16(F(amax / F(127))))
        if d == 0:                                  # every value is 0 (llama.cpp's q there is undefined)
            return [0] * len(x), 0.0
        inv = F(F(127) / amax)
        return [int(np.rint(F(v * inv))) for v in x], d
    amax, mx = F(0), F(0)                           # quantize_row_q8_K_ref
    for v in x:
        if abs(v) > amax:
            amax, mx = abs(v), v
    if amax == 0:
        return [0] * len(x), 0.0
    with np.errstate(over="ignore"):
        iscale = F(F(-127) / mx)
    if np.isinf(iscale):
        return [0] * len(x), 0.0
    return [min(127, int(np.rint(F(iscale * v)))) for v in x], float(F(F(1) / iscale))


def ref_row(x: np.ndarray, ar: int, Kp: int) -> np.ndarray:
    """The rounded row d * q as float64, Kp lanes (0 past K)."""
    xp = np.zeros(-(-Kp // ar) * ar, F)
    xp[:len(x)] = x
    out = []
    for k0 in range(0, len(xp), ar):
        q, d = ref_block(xp[k0:k0 + ar], ar)
        out += [d * v for v in q]
    return np.array(out[:Kp])


def special_row(rng, K: int, ar: int) -> np.ndarray:
    """Random lanes plus the cases the rules treat specially: a zero block, exact ties (a block whose
    amax is 127, so x * 127 / amax = x), a block of equal values, a negative largest element, +a and -a
    both largest (the first wins in Q8_K), tiny values (float16 subnormal scales)."""
    x = (rng.standard_normal(K) * rng.uniform(0.01, 3, K)).astype(F)
    x[:ar] = 0
    if K >= 2 * ar:
        x[ar:2 * ar] = rng.integers(-254, 255, ar) / F(2)        # halves: ties on the grid
        x[ar] = 127
    if K >= 3 * ar:
        x[2 * ar:3 * ar] = F(-0.75)
    if K >= 4 * ar:
        x[3 * ar + 5] = -40.0
        x[3 * ar + 9] = 40.0
    if K >= 5 * ar:
        x[4 * ar:5 * ar] *= F(1e-7)
    if K >= 6 * ar:
        x[5 * ar:6 * ar] *= F(1e-38)                              # d = 0 in float16, 127/amax = inf
    return x


def test_numpy_definition_matches_the_scalar_rules():
    rng = np.random.default_rng(0)
    for ar in (32, 256):
        for K in (6 * ar, 6 * ar + 40):
            x = special_row(rng, K, ar)
            want = ref_row(x, ar, K)
            assert np.array_equal(q8_values(x[None], ar)[0], want), ar
            q, d = q8_round(x[None], ar)
            assert q.min() >= -127 and q.max() <= 127
    # ties round to even on the grid: 2.5 -> 2, -3.5 -> -4 (x86 _mm256_round_ps), not away from zero
    x = np.zeros(32, F)
    x[:4] = [127, 2.5, -3.5, 0.5]
    assert q8_round(x[None], 32)[0][0, :4].tolist() == [127, 2, -4, 0]
    # Q8_K: the first of +-max sets the sign of the scale (iscale = -127 / max)
    x = np.zeros(256, F)
    x[3], x[7] = -2.0, 2.0
    q, d = q8_round(x[None], 256)
    assert (q[0, 3], q[0, 7]) == (-127, 127) and d[0, 0] == F(1) / F(F(-127) / F(-2)) > 0
    x[3], x[7] = 2.0, -2.0
    q, d = q8_round(x[None], 256)
    assert (q[0, 3], q[0, 7]) == (-127, 127) and d[0, 0] < 0


def test_q8_0_against_gguf_quantizer():
    """gguf's Q8_0 (llama.cpp's scalar reference: q = roundf(x * (1/d))) gives the same float16 d always,
    and the same q on every lane that is not within a few ulps of a half (the x86 rule multiplies by
    127/amax and rounds ties to even)."""
    from gguf import GGMLQuantizationType, dequantize, quantize
    rng = np.random.default_rng(1)
    x = (rng.standard_normal((4, 4096)) * rng.uniform(0.01, 3, (4, 4096))).astype(F)
    raw = quantize(x, GGMLQuantizationType.Q8_0).reshape(4, -1, 34)
    d_gguf = raw[..., :2].copy().view(np.float16)[..., 0].astype(F)
    q_gguf = raw[..., 2:].view(np.int8).astype(np.int32).reshape(4, -1)
    q, d = q8_round(x, 32)
    assert np.array_equal(d, d_gguf)
    t = x.reshape(4, -1, 32) * (F(127) / np.abs(x.reshape(4, -1, 32)).max(-1, keepdims=True))
    near_half = np.abs(np.abs(t - np.trunc(t)) - 0.5).reshape(4, -1) < 1e-4
    diff = q != q_gguf
    assert not np.any(diff & ~near_half) and diff.sum() <= 4
    np.testing.assert_array_equal(dequantize(raw.reshape(4, -1), GGMLQuantizationType.Q8_0)[~diff],
                                  (q * np.repeat(d, 32, axis=1))[~diff])


def kernel_round(isa: str, x: np.ndarray, Kp: int, G: int, ar: int):
    ffi, lib = build.load()
    L = lib.ab_i8_block(G, ar)
    q16 = np.zeros(Kp, np.int16)
    sx = np.zeros(Kp // L, F)
    gs = np.zeros(Kp // G, F)
    rc = lib.ab_i8_quantize_q8(cpu_backend.ISAS.index(isa), ffi.cast("float *", x.ctypes.data), len(x), Kp, G, ar,
                               ffi.cast("int16_t *", q16.ctypes.data), ffi.cast("float *", sx.ctypes.data),
                               ffi.cast("float *", gs.ctypes.data))
    assert rc == 0
    return q16, sx, gs, L


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("ar,G,K,Kp", [(32, 32, 1600, 1600), (32, 32, 1000, 1024), (32, 128, 1000, 1024),
                                       (256, 32, 1536, 1536), (256, 16, 1536, 1536), (256, 64, 1600, 1600),
                                       (256, 512, 2048, 2048)])
def test_kernel_rounding_bitwise(isa, ar, G, K, Kp):
    """The C quantizer of the byte-code kernel: x16 * block scale equals llama.cpp's d * q on every lane
    (padding included), on every isa path bit for bit; the table block divides the grid block; group sums
    are the float32 rounding of the exact sums of d * q."""
    x = special_row(np.random.default_rng(K + ar + G), K, ar)
    q16, sx, gs, L = kernel_round(isa, x, Kp, G, ar)
    assert L == gcd(a16_block(G), ar) and ar % L == 0 and G % L == 0
    assert np.all(sx >= 0) and np.abs(q16).max() <= 127
    got = q16 * np.repeat(sx, L).astype(np.float64)
    want = ref_row(x, ar, Kp)
    assert np.array_equal(got, want)
    sums = want.reshape(-1, G).sum(1)
    assert np.all(np.abs(gs - sums) <= 2 ** -23 * np.abs(sums) + 1e-30)
    port = kernel_round("portable", x, Kp, G, ar)
    for a, b in zip((q16, sx, gs), port):
        assert np.array_equal(a, b)


def test_kernel_block_rule_and_bad_blocks():
    ffi, lib = build.load()
    assert [lib.ab_i8_block(G, ar) for G, ar in ((32, 32), (128, 32), (32, 256), (16, 256), (512, 256))] == \
           [32, 32, 32, 16, 256]
    assert lib.ab_i8_block(32, 64) == -3 and lib.ab_i8_block(32, 0) == 32


def make_lins(rng):
    """Weights of every parameter form: plain float32 groups (symmetric, asymmetric, group 128), exact
    Q8_0 / Q4_1 imports (float16 parameters) and two-level K-quant and Q5_0 imports (16- and 32-lane
    sub-blocks, codes in parts)."""
    from tests.test_cpu_linear import exact_lin
    from tests.test_kquant import packed, random_blocks
    K = 512
    w = rng.standard_normal((70, K))
    lins = {"w4g32": PackedLinear.from_quant(quantize_weights(w, 4, 32)),
            "w3g128a": PackedLinear.from_quant(quantize_weights(w, 3, 128, asymmetric=True)),
            "Q8_0": exact_lin(rng, 70, K, "Q8_0"), "Q4_1": exact_lin(rng, 70, K, "Q4_1")}
    for kind in ("Q5_0", "Q4_K", "Q6_K", "Q2_K"):
        lins[kind] = packed(random_blocks(kind, 70, K, 3), kind)
    return lins


@pytest.mark.parametrize("isa", ISAS)
def test_linear_q8_is_float64_of_the_rounded_row(isa):
    """y = W_dequantized x_rounded to float32 rounding, for both blocks on every weight form (the byte-code
    kernel; the table kernel is fed the rounded row as floats); and clearly not the A16 product."""
    rng = np.random.default_rng(7)
    lins = make_lins(rng)
    x = special_row(rng, 512, 32)[None].repeat(3, 0)
    x[1] = (rng.standard_normal(512) * 2).astype(F)
    x[2] = 0
    for i8 in (1, 9):
        be = CpuBackend(threads=2, isa=isa, i8_min_bits=i8)
        for name, lin in lins.items():
            W = lin.dequantize()
            h = be.prepare_linear(lin)
            for ar in (32, 256):
                xr = q8_values(x, ar)
                ref = xr @ W.T
                tol = 2e-6 * (np.abs(xr) @ np.abs(W).T) + 1e-30
                y = be.linear(h, x, abits="q8", agroup=ar)
                if h.codes is None:         # table kernel: the rounded row as floats, tables of 16 bits
                    np.testing.assert_array_equal(y, be.linear(h, xr.astype(F), abits=16))
                    continue
                assert np.all(np.abs(y - ref) <= tol), (isa, i8, name, ar, np.max(np.abs(y - ref) / tol))
                y16 = be.linear(h, x, abits=16)
                assert np.max(np.abs(y16 - ref) / tol) > 10, (name, ar)       # the rounding is there
        be.close()


def test_linear_q8_same_bits_on_every_isa():
    """The byte-code product with q8 rounding gives the same floats on every isa path (M = 1 and M > 1)."""
    rng = np.random.default_rng(11)
    lins = make_lins(rng)
    x = (rng.standard_normal((5, 512)) * rng.uniform(0.1, 3, 512)).astype(F)
    for name, lin in lins.items():
        for ar in (32, 256):
            ys = []
            for isa in ISAS:
                be = CpuBackend(threads=2, isa=isa, i8_min_bits=1)
                h = be.prepare_linear(lin)
                ys.append(np.concatenate([be.linear(h, x[:1], abits="q8", agroup=ar),
                                          be.linear(h, x, abits="q8", agroup=ar)]))
                be.close()
            for y in ys[1:]:
                np.testing.assert_array_equal(y, ys[0], err_msg=f"{name} {ar}")


def test_linear_q8_bad_block():
    be = CpuBackend(threads=1)
    h = be.prepare_linear(PackedLinear.from_quant(quantize_weights(np.ones((4, 64)), 4, 32)))
    with pytest.raises(ValueError, match="32 .*or 256"):
        be.linear(h, np.ones((1, 64), F), abits="q8", agroup=64)
    with pytest.raises(ValueError, match="abits"):
        be.linear(h, np.ones((1, 64), F), abits="q9")
    be.close()


def test_block_for_type():
    assert [block_for_type(t) for t in ("Q8_0", "Q5_0", "Q4_1", "IQ4_NL", "F32", None, "Q4_K", "Q6_K", "IQ4_XS")] == \
           [32, 32, 32, 32, 32, 32, 256, 256, 256]


def test_abits_validation():
    import argparse

    import engine
    assert check_abits("q8") == "q8" and check_abits(" Q8 ") == "q8" and check_abits(8) == 8
    for bad in ("q9", 0, 12, None, "8bit"):
        with pytest.raises(ValueError, match="abits must be 1..8, 16 or 'q8'"):
            check_abits(bad)
    with pytest.raises(argparse.ArgumentTypeError):
        parse_abits("q4")
    assert parse_abits("q8") == "q8" and parse_abits("16") == 16
    with pytest.raises(ValueError, match="abits"):
        engine.load(abits="q7")
    with pytest.raises(ValueError, match="agroup does not apply"):
        engine.load(abits="q8", agroup=32)
    with pytest.raises(ValueError, match="CPU only"):
        engine.load(abits="q8", device="cuda")


def test_cli_abits_option():
    from engine.generate import parser
    assert parser().parse_args(["hi", "--abits", "q8"]).abits == "q8"
    with pytest.raises(SystemExit) as e:
        parser().parse_args(["hi", "--abits", "q3"])
    assert e.value.code == 2


def tiny_packed(types: dict):
    """A tiny random Llama (tests/data_gen), packed at its own bits, with the source types of `types`
    written into its tensor info (the q8 blocks follow them; the weights stay as they are)."""
    from loader.pack import Recipe, quantize_model
    from tests.data_gen.tiny_models import tiny_llama_weights, write_tiny_gguf
    from loader.gguf_reader import read_gguf
    import tempfile
    from pathlib import Path
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "tiny.gguf"
        write_tiny_gguf(path, default_type="F32")
        pm = quantize_model(read_gguf(path), Recipe(wbits=8, group=32))
    for name, t in types.items():
        pm.info[name]["source_type"] = t
    return pm


def test_decoder_keeps_mixed_roundings_apart_and_compiles_them():
    """q|k|v whose sources pair with different grids are separate products, each with its block; the
    compiled C program runs them in C with the same results as the op-by-op backend calls."""
    from engine.decoder import Decoder
    pm = tiny_packed({"layers.0.wv": "Q6_K", "layers.0.w_down": "Q4_K"})
    be = CpuBackend(threads=2)
    dec = Decoder(pm, be, abits="q8")
    lf = dec.linear_for
    assert len({id(lf[f"layers.0.{n}"]) for n in ("wq", "wk", "wv")}) == 3
    assert (lf["layers.0.wq"].agroup, lf["layers.0.wv"].agroup, lf["layers.0.w_down"].agroup) == (32, 256, 256)
    assert lf["layers.1.wq"] is lf["layers.1.wv"] and lf["layers.1.wv"].agroup == 32
    assert "linear" not in dec.program.python_ops
    ids = [1, 5, 9, 13, 2, 7]
    got = dec.forward(ids, dec.new_cache(), all_logits=True)
    ref_dec = Decoder(pm, be, abits="q8", interpret=True)
    want = ref_dec.forward(ids, ref_dec.new_cache(), all_logits=True)
    np.testing.assert_array_equal(got, want)
    a16 = Decoder(pm, be, abits=16)
    z16 = a16.forward(ids, a16.new_cache(), all_logits=True)
    assert np.abs(z16 - got).max() > 1e-4
    # the NumPy backend (runtime/act_q8.py's rounding, float32 products) runs the same model
    from runtime.numpy_backend import NumpyBackend
    from tests.reference_forward import kl_per_position
    npd = Decoder(pm, NumpyBackend(), abits="q8")
    znp = npd.forward(ids, npd.new_cache(), all_logits=True)
    assert kl_per_position(got, znp).max() < 1e-3 * kl_per_position(got, z16).max()
    with pytest.raises(ValueError, match="agroup does not apply"):
        Decoder(pm, be, abits="q8", agroup=32)
    be.close()


# ---- slow: llama.cpp itself ---------------------------------------------------------------------------

LLAMA_QUANTIZERS = r"""
import ctypes, json, os, sys, numpy as np, llama_cpp
lib = os.path.join(os.path.dirname(llama_cpp.__file__), "lib")
ctypes.CDLL(os.path.join(lib, "libggml-base.so"), mode=ctypes.RTLD_GLOBAL)
cpu = ctypes.CDLL(os.path.join(lib, "libggml-cpu.so"), mode=ctypes.RTLD_GLOBAL)
cpu.ggml_cpu_init()
req = json.loads(sys.argv[1])
x = np.load(req["x"]).astype(np.float32)
M, K = x.shape
b0, bk = np.zeros((M, K // 32 * 34), np.uint8), np.zeros((M, K // 256 * 292), np.uint8)
for m in range(M):
    xp = x[m].ctypes.data_as(ctypes.c_void_p)
    cpu.quantize_row_q8_0(xp, b0[m].ctypes.data_as(ctypes.c_void_p), ctypes.c_int64(K))
    cpu.quantize_row_q8_K(xp, bk[m].ctypes.data_as(ctypes.c_void_p), ctypes.c_int64(K))
b0, bk = b0.reshape(M, -1, 34), bk.reshape(M, -1, 292)
np.savez(req["out"], d0=b0[..., :2].copy().view(np.float16)[..., 0].astype(np.float32),
         q0=b0[..., 2:].view(np.int8).reshape(M, K), dk=bk[..., :4].copy().view(np.float32)[..., 0],
         qk=bk[..., 4:260].view(np.int8).reshape(M, K))
"""


@pytest.mark.slow
def test_rounding_is_llama_cpps_own(tmp_path, llama_python):
    """llama.cpp's quantize_row_q8_0 / quantize_row_q8_K, called in its own CPU library, give the same d
    and q as the kernel on every isa (Q8_K's d < 0 is the kernel's (-d, -q))."""
    rng = np.random.default_rng(3)
    x = np.stack([special_row(rng, 2048, 256), special_row(rng, 2048, 32),
                  (rng.standard_normal(2048) * 3).astype(F)])
    np.save(tmp_path / "x.npy", x)
    r = subprocess.run([llama_python, "-c", LLAMA_QUANTIZERS, json.dumps({"x": str(tmp_path / "x.npy"),
                                                                         "out": str(tmp_path / "o.npz")})],
                       capture_output=True, text=True, timeout=300)
    if r.returncode != 0:
        pytest.skip(f"llama.cpp's quantizers not callable: {r.stderr.strip()[-300:]}")
    o = np.load(tmp_path / "o.npz")
    for ar, d, q in ((32, o["d0"], o["q0"]), (256, o["dk"], o["qk"])):
        want = q.astype(np.float64) * np.repeat(d, ar, axis=1).astype(np.float64)
        for isa in ISAS:
            for m in range(len(x)):
                q16, sx, _, L = kernel_round(isa, x[m], 2048, 32, ar)
                assert np.array_equal(q16 * np.repeat(sx, L).astype(np.float64), want[m]), (isa, ar, m)


@pytest.mark.slow
@pytest.mark.parametrize("ftype", ["Q8_0", "Q5_0", "Q4_0", "Q6_K", "Q4_K_M", "Q5_K_M", "Q3_K_M"])
def test_random_llama_matches_llama_cpp(tmp_path, monkeypatch, llama_python, ftype):
    """A random Llama written as F32 and quantized by llama.cpp to `ftype`, then run by llama.cpp (keys and
    values in float32) and by anybit at the file's own bits with abits "q8": the same logits up to float32
    rounding (measured max KL ~1e-12), where A16 differs by llama.cpp's 8-bit rounding (KL ~3e-4).
    Q2_K is left out: llama.cpp's Q2_K product rounds its float sums differently enough to move a few
    activations across a rounding boundary (measured KL 3e-4 either way)."""
    import engine
    from tests.test_kquant_llama import FTYPES, ORACLE, write_f32_llama
    from tools.llama_logits import llama_logits
    src, dst = tmp_path / "f32.gguf", tmp_path / f"{ftype}.gguf"
    write_f32_llama(src, monkeypatch)
    ids = [1, 17, 42, 99, 7, 123, 55, 201, 3, 64]
    cfg = dict(src=str(src), dst=str(dst), ftype=dict(FTYPES, Q8_0=7, Q4_0=2)[ftype], ids=ids,
               out=str(tmp_path / "unused.npy"))
    r = subprocess.run([llama_python, "-c", ORACLE, json.dumps(cfg)], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    want = llama_logits(dst, [ids])[0].logits.astype(np.float64)
    lp = lambda z: z - z.max(-1, keepdims=True) - np.log(np.exp(z - z.max(-1, keepdims=True)).sum(-1, keepdims=True))
    kl = lambda a, b: (np.exp(lp(a)) * (lp(a) - lp(b))).sum(-1)
    out = {}
    for ab in ("q8", 16):
        with engine.load(dst, wbits="source", abits=ab, device="cpu", threads=2, progress=False) as m:
            out[ab] = m.logits(ids).astype(np.float64)
    k8, k16 = kl(want, out["q8"]), kl(want, out[16])
    print(f"{ftype}: q8 max KL {k8.max():.1e} (mean {k8.mean():.1e}); A16 max {k16.max():.1e} (mean {k16.mean():.1e})")
    assert k8.max() < 1e-8, (ftype, k8)
    assert k16.mean() > 1e-5                 # A16 is measurably off: the comparison can fail
