"""Two-level weights (loader/kquant.py) on the CPU backend: the byte-code A16 kernel with sub-blocks of
16 and 32 lanes, codes in 1/2/4-bit parts and float16 d / dmin with 8-bit sub-scales, on every isa,
against the integer formula of kernels_int8.c in float64 and against the float64 reference product."""
import numpy as np
import pytest

from loader.bipolar import ref_linear_a16, unpack_planes, values_of
from loader.kquant import KQ_TYPES
from runtime.cpu import CpuBackend, available_isas, build, layout
from runtime.cpu import backend as cpu_backend
from tests.test_cpu_linear import _np_i8_quantize
from tests.test_kquant import SOURCE_BPW, packed, random_blocks

ISAS = available_isas()
_backends = {}


def backend(isa, **kw):
    key = (isa, tuple(sorted(kw.items())))
    if key not in _backends:
        _backends[key] = CpuBackend(threads=2, isa=isa, **kw)
    return _backends[key]


def integer_reference(lin, x):
    """y by the kernel's own definition: per block of G lanes, s * sx * D + o * sum(x), D = sum v * x16 exact,
    with s, o the float32 parameters the kernels rebuild (SubScales.params) and x16 as kernels_int8.c
    quantizes it. Returns (y, tolerance) in float64."""
    G, K, Kp, N = lin.group, lin.K, lin.Kp, lin.N
    s, o = (a.astype(np.float64) for a in lin.sub.params())
    v = values_of(unpack_planes(lin.planes), lin.bits).astype(np.int64)
    ys, tols = [], []
    for xm in x:
        q, sx = _np_i8_quantize(xm, K, Kp, G)
        D = (v * q).reshape(N, -1, G).sum(-1)
        terms = s * sx.astype(np.float64) * D
        oterms = o * np.pad(xm.astype(np.float64), (0, Kp - K)).reshape(-1, G).sum(-1)
        ys.append(terms.sum(1) + oterms.sum(1))
        tols.append(1e-6 * (np.abs(terms).sum(1) + np.abs(oterms).sum(1)) + 1e-30)
    return np.array(ys), np.array(tols)


@pytest.mark.parametrize("kind", list(KQ_TYPES))
def test_a16_every_isa(kind):
    rng = np.random.default_rng(list(KQ_TYPES).index(kind))
    lin = packed(random_blocks(kind, 130, 512, 5), kind)
    x = (rng.standard_normal((3, 512)) * rng.uniform(0.1, 3, 512)).astype(np.float32)
    x[2] = 0.0
    ref_int, tol = integer_reference(lin, x)
    ref = ref_linear_a16(lin, x)
    norm = np.linalg.norm(x, axis=1)[:, None] * np.linalg.norm(lin.dequantize(), axis=1)[None] + 1e-30
    ys = []
    for isa in ISAS:
        be = backend(isa)
        h = be.prepare_linear(lin)
        assert h.param_dtype == "two-level" and h.wl is None
        y = be.linear(h, x)
        assert np.all(np.abs(y - ref_int) <= tol), (isa, np.max(np.abs(y - ref_int) / tol))
        assert np.max(np.abs(y - ref) / norm) < 1e-4
        ys.append(y)
    for y in ys[1:]:
        np.testing.assert_array_equal(y, ys[0])          # the same floats on every isa


@pytest.mark.parametrize("kind,k", [(t, None) for t in KQ_TYPES] + [("Q4_K", 2), ("Q6_K", 4), ("Q5_K", 1)])
def test_one_token_is_the_batched_row(kind, k):
    """Decode (one activation row) has its own AVX-512 loops, batches of up to 8 rows theirs (row tiles):
    each row alone gives the bits it gets inside a batch of 8 + 3 rows, on every isa, and the integer
    formula's value."""
    lin = packed(random_blocks(kind, 200, 768, 4), kind)
    lin = lin.nested(k) if k else lin
    x = (np.random.default_rng(5).standard_normal((11, 768)) * 2).astype(np.float32)     # 8 + 3 rows
    ref_int, tol = integer_reference(lin, x)
    for isa in ISAS:
        be = backend(isa)
        h = be.prepare_linear(lin)
        batch = be.linear(h, x)
        assert np.all(np.abs(batch - ref_int) <= tol), isa
        for m in range(11):
            np.testing.assert_array_equal(be.linear(h, x[m:m + 1])[0], batch[m], err_msg=f"{isa} row {m}")


@pytest.mark.parametrize("kind,k", [("Q6_K", 4), ("Q5_K", 3), ("Q4_K", 2), ("Q5_0", 1), ("Q3_K", 2)])
def test_nested_precision(kind, k):
    """The top k planes of an import run as a k-bit weight (d * 2^(p-k), c0 / 2^(p-k))."""
    lin = packed(random_blocks(kind, 64, 256, 9), kind).nested(k)
    x = np.random.default_rng(k).standard_normal((2, 256)).astype(np.float32)
    ref_int, tol = integer_reference(lin, x)
    for isa in ISAS:
        be = backend(isa)
        y = be.linear(be.prepare_linear(lin), x)
        assert np.all(np.abs(y - ref_int) <= tol), isa


@pytest.mark.parametrize("kind", ["Q4_K", "Q6_K", "Q2_K"])
def test_f32_path_and_bad_handles(kind):
    lin = packed(random_blocks(kind, 70, 256, 2), kind)
    x = np.random.default_rng(0).standard_normal((2, 256)).astype(np.float32)
    be = backend(ISAS[0], a16="f32")
    y = be.linear(be.prepare_linear(lin), x)
    ref = ref_linear_a16(lin, x)
    np.testing.assert_allclose(y, ref, rtol=1e-5, atol=1e-5 * np.abs(ref).max())
    # a corrupted header is refused (bad arguments), never read past
    be = backend(ISAS[-1])
    h = be.prepare_linear(lin)
    h.wsc[0] ^= 1
    with pytest.raises(Exception, match="linear_a16|argument"):
        be.linear(h, x)


@pytest.mark.parametrize("p", range(1, 9))
def test_code_parts_roundtrip(p):
    rng = np.random.default_rng(p)
    planes = rng.integers(0, 2**32, (p, 70, 16), dtype=np.uint64).astype(np.uint32)
    ct, parts = layout.kq_codes_tiles(planes)
    bits = max(p, 2)                                         # a nested 1-bit weight keeps 2-bit containers
    assert sum(cw for cw, _s, _q in parts) == bits and all(cw in (1, 2, 4, 8) for cw, _s, _q in parts)
    assert ct.nbytes == 2 * 64 * 16 * 4 * bits               # bits per weight (2 tiles of 64 rows)
    np.testing.assert_array_equal(layout.kq_uncodes_tiles(ct, 70, p, 512), planes)
    np.testing.assert_array_equal(layout.kq_codes_tiles(planes, chunk_tiles=1)[0], ct)     # built in pieces


@pytest.mark.parametrize("kind", [t for t in KQ_TYPES if not t.startswith("IQ")])
def test_in_memory_bytes_near_source(kind):
    """What the A16 kernel reads per weight (code parts + parameter blob): within 10% of the source's."""
    lin = packed(random_blocks(kind, 256, 2048, 1), kind)
    h = backend(ISAS[-1]).prepare_linear(lin)
    bpw = (h.codes.nbytes + h.wsc.nbytes) * 8 / (lin.N * lin.K)
    assert bpw <= 1.10 * SOURCE_BPW[kind], (kind, bpw, SOURCE_BPW[kind])


def test_planes_rebuilt_for_other_kernels():
    lin = packed(random_blocks("Q5_K", 64, 256, 3), "Q5_K")
    be = backend(ISAS[-1])
    h = be.prepare_linear(lin)
    assert h.planes is None
    np.testing.assert_array_equal(be._planes(h), lin.planes)
    _, lib = build.load()
    assert cpu_backend.layout.KQ_FLAG == 1 << 30 and lib is not None


def kq_llama(types: dict[str, str], d=256, F=512, V=96, H=4, Hkv=2, seed=0):
    """A tiny Llama whose linears are GGUF blocks of the given types (random codes and sub-scales, d
    chosen so that weights have the spread of a trained layer); everything else float."""
    from loader.source import ModelConfig, SourceModel, SourceTensor

    rng = np.random.default_rng(seed)
    hd = d // H
    shapes = {"output": (V, d)}
    for i in range(2):
        p = f"layers.{i}."
        shapes.update({p + "wq": (H * hd, d), p + "wk": (Hkv * hd, d), p + "wv": (Hkv * hd, d), p + "wo": (d, H * hd),
                       p + "w_gate": (F, d), p + "w_up": (F, d), p + "w_down": (d, F)})
    tensors = {}
    for n, (N, K) in shapes.items():
        kind = types[n.rsplit(".", 1)[-1]]
        bits, _G, S, nbytes, _c0 = KQ_TYPES[kind]
        raw = random_blocks(kind, N, K, int(rng.integers(1 << 30))).reshape(N, K // S, nbytes)
        from loader.kquant import F16_FIELDS
        for off in F16_FIELDS[kind]:
            sc = {"Q4_K": 32, "Q5_K": 32, "Q6_K": 64, "Q3_K": 16, "Q2_K": 8}.get(kind, 1)   # typical |sub-scale|
            f = (np.abs(rng.standard_normal((N, K // S))) * 8.0 / np.sqrt(K) / (1 << bits) / sc).astype("<f2")
            raw[:, :, off:off + 2] = f.view(np.uint8).reshape(N, K // S, 2)
        raw = raw.reshape(N, -1)
        import gguf
        from loader.kquant import decode
        w = gguf.quants.dequantize(raw, gguf.GGMLQuantizationType[kind])
        tensors[n] = SourceTensor(n, (N, K), (lambda w=w: w), ggml_type=kind,
                                  blocks=(lambda raw=raw, kind=kind, N=N, K=K: decode(raw, kind, N, K)))
    for i in range(2):
        for n in ("attn_norm", "ffn_norm"):
            a = (1 + 0.1 * rng.standard_normal(d)).astype(np.float32)
            tensors[f"layers.{i}.{n}"] = SourceTensor(f"layers.{i}.{n}", (d,), (lambda a=a: a))
    a = (1 + 0.1 * rng.standard_normal(d)).astype(np.float32)
    tensors["norm"] = SourceTensor("norm", (d,), (lambda a=a: a))
    cfg = ModelConfig(arch="llama", dim=d, n_layers=2, n_heads=H, n_kv_heads=Hkv, ffn_dim=F, vocab_size=V,
                      max_seq_len=64, norm_eps=1e-5, rope_theta=10000.0, rope_style="adjacent",
                      tied_embeddings=True, eos_ids=[0])
    tok = '{"version":"1.0","model":{"type":"BPE","vocab":{},"merges":[]}}'
    return SourceModel(cfg, tensors, tok, "tiny-kq")


MIXES = [dict(wq="Q4_K", wk="Q4_K", wv="Q4_K", wo="Q6_K", w_gate="Q5_K", w_up="Q5_K", w_down="Q6_K", output="Q5_0"),
         dict(wq="Q3_K", wk="Q3_K", wv="Q3_K", wo="Q2_K", w_gate="Q2_K", w_up="Q2_K", w_down="Q3_K", output="Q5_1"),
         dict(wq="Q5_0", wk="Q5_0", wv="Q5_0", wo="Q4_K", w_gate="Q6_K", w_up="Q6_K", w_down="Q4_K", output="Q6_K")]


@pytest.mark.parametrize("mix", range(len(MIXES)))
def test_model_at_source_precision(mix):
    """wbits 0 packs every linear exactly at its source's bits; the fused C forward equals the per-op
    decoder bitwise and both match the float model of the dequantized source (KL < 1e-4)."""
    from engine.decoder import Decoder
    from loader.pack import Recipe, quantize_model

    src = kq_llama(MIXES[mix], seed=mix)
    pm = quantize_model(src, Recipe(wbits=0))
    assert all(m["exact"] for m in pm.info.values()), pm.info
    assert all(pm.tensors[n].sub is not None for n in pm.info)
    fm = quantize_model(src, Recipe(wbits=16))
    be = backend(ISAS[-1])
    ids = [3, 9, 27, 81, 11, 2, 50]
    # the op-by-op interpreter of the graph against the compiled C program (runtime/cpu/kernels_graph.c)
    ref, fast, flt = Decoder(pm, be, interpret=True), Decoder(pm, be), Decoder(fm, be)
    assert fast.program.python_ops == ["embed"]
    c0, c1, c2 = ref.new_cache(), fast.new_cache(), flt.new_cache()
    y0 = ref.forward(ids, c0, all_logits=True)
    np.testing.assert_array_equal(fast.forward(ids, c1, all_logits=True), y0)
    np.testing.assert_array_equal(fast.forward([7], c1), ref.forward([7], c0))
    yf = flt.forward(ids, c2, all_logits=True).astype(np.float64)
    lp = lambda z: z - z.max(-1, keepdims=True) - np.log(np.exp(z - z.max(-1, keepdims=True)).sum(-1, keepdims=True))
    kl = (np.exp(lp(yf)) * (lp(yf) - lp(y0.astype(np.float64)))).sum(-1).max()
    assert kl < 1e-4 and np.abs(yf).max() > 1e-3, kl


@pytest.mark.parametrize("kind,abits,agroup", [("Q4_K", 8, 32), ("Q6_K", 8, 32), ("Q2_K", 4, 64), ("Q5_0", 6, "token"),
                                               ("Q3_K", 8, 256), ("Q5_K", 4, 32)])
def test_quantized_activations_every_isa(kind, abits, agroup):
    """abits < 16 on the byte kernel (kernels_quant.c): blocks of min(G, Ga) lanes, 16 for Q6_K/Q3_K/Q2_K;
    the exact block integers against NumPy and y against the float64 reference, the same floats on
    every isa."""
    from loader.bipolar import quantize_activations, ref_linear_quant
    lin = packed(random_blocks(kind, 70, 512, 4), kind)
    x = np.random.default_rng(abits).standard_normal((3, 512)).astype(np.float32)
    ga = 512 if agroup == "token" else agroup
    ref = ref_linear_quant(lin, x, abits, ga)
    ys = []
    for isa in ISAS:
        be = backend(isa)
        h = be.prepare_linear(lin)
        y = be.linear(h, x, abits=abits, agroup=agroup)
        np.testing.assert_allclose(y, ref, rtol=1e-5, atol=1e-5 * np.abs(ref).max())
        ys.append(y)
    for y in ys[1:]:
        np.testing.assert_array_equal(y, ys[0])
    be = backend(ISAS[-1])
    _y, I, U, L = be.linear_quant_debug(be.prepare_linear(lin), x, abits, agroup)
    assert L == min(lin.group, ga)
    qa = quantize_activations(x.astype(np.float64), abits, ga)
    u = (2 * qa.codes.astype(np.int64) - ((1 << abits) - 1)) * (np.arange(qa.codes.shape[1]) < 512)
    v = values_of(unpack_planes(lin.planes), lin.bits).astype(np.int64)
    np.testing.assert_array_equal(I, np.einsum("mbl,nbl->mnb", u.reshape(3, -1, L), v.reshape(70, -1, L)))
    np.testing.assert_array_equal(U, np.broadcast_to(u.reshape(3, 1, -1, L).sum(-1), I.shape))


@pytest.mark.parametrize("mix", [0, 1])
def test_model_quantized_activations_fused(mix):
    from engine.decoder import Decoder
    from loader.pack import Recipe, quantize_model

    pm = quantize_model(kq_llama(MIXES[mix], seed=mix), Recipe(wbits=0))
    be = backend(ISAS[-1])
    ref, fast = Decoder(pm, be, abits=8, agroup=None, interpret=True), Decoder(pm, be, abits=8, agroup=None)
    assert fast.program.python_ops == ["embed"]
    ids = [5, 17, 2, 9]
    c0, c1 = ref.new_cache(), fast.new_cache()
    np.testing.assert_array_equal(fast.forward(ids, c1, all_logits=True), ref.forward(ids, c0, all_logits=True))
    np.testing.assert_array_equal(fast.forward([4], c1), ref.forward([4], c0))


def test_pack_summary_per_source_type(tmp_path):
    """tools.pack's summary says per source type what was exact and what was rounded; a packed file keeps
    the two-level form (format version 4, covered by the config checksum) and reads back the same, also
    when it is streamed tensor by tensor (loader/pack_writer.py pack_to_dir)."""
    from loader.pack import Recipe, quantize_model
    from loader.packed import read_packed, write_packed
    from tools.pack import summarize

    src = kq_llama(MIXES[0], seed=3)
    pm = quantize_model(src, Recipe(wbits=4))          # Q4_K exact; Q5_K, Q6_K, Q5_0 rounded to 4 bits at G32
    text = summarize(pm, 1 << 20, 1.0)
    assert "6 Q4_K -> W4 G32" in text.split("rounded")[0] and "4 Q6_K -> W4 G32" in text.split("rounded")[1], text
    assert all(m["group"] == 32 for m in pm.info.values())
    pm0 = quantize_model(src, Recipe(wbits=0))
    write_packed(pm0, tmp_path / "m")
    back = read_packed(tmp_path / "m")
    for n in pm0.info:
        a, b = pm0.tensors[n], back.tensors[n]
        assert b.sub is not None and b.bits == a.bits and b.group == a.group
        np.testing.assert_array_equal(b.dequantize(), a.dequantize())
    assert back.weight_bytes == pm0.weight_bytes
    import json
    cfg = json.loads((tmp_path / "m" / "config.json").read_text())
    assert cfg["version"] == 4 and cfg["tensors"]["output"]["sub"]["G"] == 32
    from loader.pack_writer import pack_to_dir
    pack_to_dir(src, Recipe(wbits=0), tmp_path / "s")
    streamed = read_packed(tmp_path / "s")
    for n in pm0.info:
        np.testing.assert_array_equal(streamed.tensors[n].planes, pm0.tensors[n].planes)
        np.testing.assert_array_equal(streamed.tensors[n].dequantize(), pm0.tensors[n].dequantize())
    # the two-level fields are covered by config.json's own checksum: an edited c0 is refused
    cfg["tensors"]["output"]["sub"]["c0"] += 1
    (tmp_path / "s" / "config.json").write_text(json.dumps(cfg))
    from loader.errors import FormatError
    with pytest.raises(FormatError, match="config.json"):
        read_packed(tmp_path / "s")


@pytest.mark.parametrize("edit,msg", [
    (lambda c: c.update(version=3), r"tensors\['output'\] has two-level parameters \(sub\), which need format version 4"),
    (lambda c: c["tensors"]["output"]["sub"].update(G=8), r"tensors\['output'\]: sub: G must be one of 16, 32"),
    (lambda c: c["tensors"]["output"]["sub"].pop("c0"), r"tensors\['output'\]: sub: .*c0"),
    (lambda c: c["tensors"]["output"].update(group=64), r"tensors\['output'\]: sub-block G=32 / super-block S=32 do not fit"),
    (lambda c: c["tensors"]["output"].update(rotate=32), r"neither rotated nor smoothed"),
])
def test_two_level_config_fields_are_checked(tmp_path, edit, msg):
    """A packed config whose two-level entry is wrong (even with a matching config checksum, as a
    deliberate edit would have) is refused with the file and the tensor named, before any tensor is read."""
    import json
    from loader.errors import FormatError
    from loader.pack import Recipe, quantize_model
    from loader.packed import config_digest, read_packed, write_packed

    write_packed(quantize_model(kq_llama(MIXES[0], seed=4), Recipe(wbits=0)), tmp_path / "m")
    path = tmp_path / "m" / "config.json"
    cfg = json.loads(path.read_text())
    edit(cfg)
    cfg["config_sha256"] = config_digest(cfg)
    path.write_text(json.dumps(cfg))
    with pytest.raises(FormatError, match=msg) as e:
        read_packed(tmp_path / "m")
    assert str(path) in str(e.value)


def test_model_without_two_level_tensors_stays_version_3(tmp_path):
    import json
    from loader.pack import Recipe
    from loader.pack_writer import pack_to_dir

    pack_to_dir(kq_llama(MIXES[0], seed=5), Recipe(wbits=8, group=64), tmp_path / "m")
    cfg = json.loads((tmp_path / "m" / "config.json").read_text())
    assert cfg["version"] == 3 and not any("sub" in m for m in cfg["tensors"].values())
