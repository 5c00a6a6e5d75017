"""Memory of loading two-level weights on the CPU (issue 17): fused weights tiled from their parts without a
concatenated copy (CpuBackend.prepare_rows), parameters kept once (layout.BlobSub), mapped file pages
given back as they are read, and embedding rows read with pread (loader.packed.FileMap.take)."""
import sys

import numpy as np
import pytest

from loader.bipolar import concat_rows
from loader.kquant import KQ_TYPES
from runtime.cpu import CpuBackend, available_isas, layout
from tests.test_kquant import packed, random_blocks

ISAS = available_isas()


@pytest.fixture(scope="module")
def be():
    b = CpuBackend(threads=2, isa=ISAS[-1])
    yield b
    b.close()


@pytest.mark.parametrize("kind", ["Q5_0", "Q4_K", "Q6_K", "Q2_K"])
def test_prepare_rows_is_the_concatenation(be, kind):
    """Rows of parts that are not multiples of 64 (a tile straddles two parts): the same codes, blob and
    products as preparing the concatenated weight, and every source byte reported read exactly once."""
    K = 512
    lins = [packed(random_blocks(kind, n, K, seed), kind) for seed, n in enumerate((70, 64, 130))]
    x = np.random.default_rng(1).standard_normal((3, K)).astype(np.float32)
    want = be.prepare_linear(concat_rows(lins))
    seen = []
    got = be.prepare_rows(lins, release=lambda views: seen.extend(views))
    np.testing.assert_array_equal(got.codes, want.codes)
    np.testing.assert_array_equal(got.wsc, want.wsc)
    np.testing.assert_array_equal(be.linear(got, x), be.linear(want, x))
    assert got.lin.N == want.lin.N == 264 and got.lin.sub.G == KQ_TYPES[kind][1]
    # chunks of one tile: the release calls then cover each part's planes row range by row range
    seen.clear()
    codes, _ = layout.kq_codes_tiles([x_.planes for x_ in lins], chunk_tiles=1, release=lambda v: seen.extend(v))
    np.testing.assert_array_equal(codes, want.codes)
    assert sum(v.nbytes for v in seen) == sum(x_.planes.nbytes for x_ in lins)


@pytest.mark.parametrize("kind", ["Q4_K", "Q5_0", "Q2_K", "Q6_K"])
def test_blob_gives_back_the_parameters(be, kind):
    """A prepared weight keeps its parameters once, in the kernels' blob; the float32 (s, o) that the f32
    and popcount paths read are rebuilt from it exactly."""
    lins = [packed(random_blocks(kind, n, 256, 7 + n), kind) for n in (40, 90)]
    h = be.prepare_rows(lins)
    cat = concat_rows(lins)
    back = layout.kq_unblob(h.wsc, cat.N)
    for f in ("d", "sc", "dmin", "m"):
        a, b = getattr(cat.sub, f), getattr(back, f)
        assert (a is None) == (b is None), f
        if a is not None:
            assert a.dtype == b.dtype
            np.testing.assert_array_equal(a, b)
    assert (back.G, back.S, back.c0, back.nib) == (cat.sub.G, cat.sub.S, cat.sub.c0, cat.sub.nib)
    np.testing.assert_array_equal(h.lin.scales, cat.scales)
    np.testing.assert_array_equal(h.lin.offsets, cat.offsets)


def test_filemap_take_reads_rows_without_the_map(tmp_path):
    from loader.packed import FileMap
    a = np.arange(3 * 50 * 7, dtype=np.uint32).reshape(3, 50, 7)
    b = np.arange(50 * 4, dtype=np.float16).reshape(50, 4)
    path = tmp_path / "f.bin"
    path.write_bytes(a.tobytes() + b.tobytes())
    fm = FileMap(path)
    ma, mb = fm.array(0, np.uint32, a.shape), fm.array(a.nbytes, np.float16, b.shape)
    ids = [4, 0, 49, 4, -1]
    np.testing.assert_array_equal(fm.take(ma, ids), a[:, ids, :])
    np.testing.assert_array_equal(fm.take(mb, ids), b[ids])
    np.testing.assert_array_equal(fm.take(ma[1:], [2]), a[1:, [2], :])        # a view inside the map
    np.testing.assert_array_equal(fm.take(b, [1, 2]), b[[1, 2]])               # not a view: plain indexing
    with pytest.raises(IndexError):
        fm.take(ma, [50])


def _file_rss_mb(path) -> float:
    """Resident MB of this process's mappings of `path` (/proc/self/smaps)."""
    total, cur = 0, None
    for line in open("/proc/self/smaps"):
        head = line.split()
        if "-" in head[0] and len(head) >= 5 and not line.startswith(("Rss", "Pss")) and ":" not in head[0]:
            cur = head[-1] if len(head) >= 6 else None
        elif head[0] == "Rss:" and cur == str(path):
            total += int(head[1])
    return total / 1024


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/smaps")
def test_decoder_leaves_no_file_pages_mapped(tmp_path, be):
    """After the decoder has prepared a packed model and run a prompt, almost none of the packed file is
    resident in this process: its pages were given back as each weight was tiled, and embedding rows are
    read with pread. Two-level weights (Q5_0, Q4_K, Q6_K) and the float norms of a tiny Llama."""
    from engine.decoder import Decoder
    from loader.pack import Recipe
    from loader.pack_writer import pack_to_dir
    from loader.packed import read_packed
    from tests.test_kquant_cpu import MIXES, kq_llama

    src = kq_llama(MIXES[2], d=512, F=1024, V=2048, seed=2)
    pack_to_dir(src, Recipe(wbits=0), tmp_path / "m")
    st = tmp_path / "m" / "model.safetensors"
    pm = read_packed(tmp_path / "m")
    ref = Decoder(pm, be, interpret=True)           # reads through the map (no release): the reference
    y0 = ref.forward([3, 1000, 7, 2047], ref.new_cache(), all_logits=True)
    ref.close()
    del ref, pm
    pm = read_packed(tmp_path / "m")
    dec = Decoder(pm, be)
    y1 = dec.forward([3, 1000, 7, 2047], dec.new_cache(), all_logits=True)
    np.testing.assert_array_equal(y1, y0)
    size = st.stat().st_size / 2**20
    assert size > 2 and _file_rss_mb(st) < 0.2 * size, (_file_rss_mb(st), size)   # float norms stay mapped
    dec.close()
