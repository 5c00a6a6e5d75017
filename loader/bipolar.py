"""The bipolar-INT format (SPEC.md section 1, docs/DESIGN.md): quantizers, bit-plane packing, and the
float64 NumPy reference products that every backend is checked against.

A p-bit code c in [0, 2^p) stands for the odd integer v = 2c - (2^p - 1); each bit plane is a {-1,+1}
matrix (bit 1 = +1). Planes are stored MSB first so that the top k planes are the k-bit nested weight.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from loader.errors import FormatError
from loader.kquant import SubScales, concat_subscales, subscales_agree

LANES = 32  # input lanes per uint32 word


def _check_bits(bits: int, what: str = "bits") -> int:
    if not isinstance(bits, (int, np.integer)) or not 1 <= int(bits) <= 8:
        raise ValueError(f"{what} must be an integer in 1..8, got {bits!r}")
    return int(bits)


def _check_group(group: int, what: str = "group") -> int:
    if not isinstance(group, (int, np.integer)) or group <= 0 or group % LANES:
        raise ValueError(f"{what} must be a positive multiple of {LANES}, got {group!r}")
    return int(group)


def round_up(n: int, m: int) -> int:
    return -(-n // m) * m


def padded_k(K: int, group: int) -> int:
    """K rounded up to the group size (which is itself a multiple of 32)."""
    return round_up(K, group)


def values_of(codes: np.ndarray, bits: int) -> np.ndarray:
    """Bipolar odd integers of the codes: v = 2c - (2^p - 1)."""
    return 2 * codes.astype(np.int64) - ((1 << bits) - 1)


def codes_of(x: np.ndarray, scale: np.ndarray, bits: int) -> np.ndarray:
    """The SPEC code rule: clamp(round((x/s + 2^p - 1) / 2), 0, 2^p - 1). x, scale broadcast."""
    top = (1 << bits) - 1
    c = np.rint((x / scale + top) / 2.0)
    return np.clip(c, 0, top).astype(np.uint8)


@dataclass
class QuantTensor:
    """Unpacked quantized weight: codes (N, Kp) uint8, scales/offsets (N, Kp // group)."""
    codes: np.ndarray
    scales: np.ndarray
    offsets: np.ndarray | None
    bits: int
    group: int
    K: int

    def dequantize(self) -> np.ndarray:
        """float64 (N, K) = s * v + o."""
        v = values_of(self.codes, self.bits).astype(np.float64)
        s = np.repeat(self.scales.astype(np.float64), self.group, axis=1)
        w = s * v
        if self.offsets is not None:
            w += np.repeat(self.offsets.astype(np.float64), self.group, axis=1)
        return w[:, :self.K]


def _grouped(w: np.ndarray, group: int) -> tuple[np.ndarray, int]:
    """float64 (N, Kp//group, group) view of w zero-padded to a multiple of the group."""
    N, K = w.shape
    Kp = padded_k(K, group)
    wp = np.zeros((N, Kp), np.float64)
    wp[:, :K] = w
    return wp.reshape(N, Kp // group, group), Kp


def quantize_weights(w: np.ndarray, bits: int, group: int | None = 128, *, asymmetric: bool = False,
                     clip_search: bool = False) -> QuantTensor:
    """Round-to-nearest bipolar quantization per output row and group of input columns.

    group=None means per channel (one group spanning K rounded up to 32). clip_search tries shrinking
    the range (symmetric: max|w|; asymmetric: [min, max]) and keeps, per group, the factor with the
    least squared error. Padding lanes get code 0 (bits 0), which the products never read as weight.
    """
    bits = _check_bits(bits)
    w = np.asarray(w, np.float64)
    if w.ndim != 2:
        raise ValueError(f"weights must be 2-D (N, K), got shape {w.shape}")
    N, K = w.shape
    group = round_up(K, LANES) if group is None else _check_group(group)
    g, Kp = _grouped(w, group)
    valid = np.zeros((Kp,), bool)
    valid[:K] = True
    valid = valid.reshape(Kp // group, group)[None]
    top = (1 << bits) - 1
    ratios = np.linspace(1.0, 0.5, 11) if clip_search else np.array([1.0])
    best_err = np.full(g.shape[:2], np.inf)
    best_s = np.ones(g.shape[:2])
    best_o = np.zeros(g.shape[:2])
    gmax = np.where(valid, g, -np.inf).max(-1)
    gmin = np.where(valid, g, np.inf).min(-1)
    for r in ratios:
        if asymmetric:
            lo, hi = gmin * r, gmax * r
            s = (hi - lo) / (2 * top)            # v spans [-top, top]: 2*top steps of s
            o = (hi + lo) / 2
        else:
            s = np.maximum(np.abs(gmin), np.abs(gmax)) * r / top
            o = np.zeros_like(s)
        s = np.where(s > 0, s, 0.0)              # all-zero group: scale 0 makes every value exactly 0
        c = codes_of(g - o[..., None], np.where(s > 0, s, 1.0)[..., None], bits)
        err = (np.where(valid, s[..., None] * values_of(c, bits) + o[..., None] - g, 0.0) ** 2).sum(-1)
        better = err < best_err
        best_err = np.where(better, err, best_err)
        best_s = np.where(better, s, best_s)
        best_o = np.where(better, o, best_o)
    codes = codes_of(g - best_o[..., None], np.where(best_s > 0, best_s, 1.0)[..., None], bits)
    codes = np.where(valid, codes, 0).reshape(N, Kp).astype(np.uint8)
    return QuantTensor(codes, best_s.astype(np.float32), best_o.astype(np.float32) if asymmetric else None,
                       bits, group, K)


def quantize_activations(x: np.ndarray, bits: int, group: int) -> QuantTensor:
    """Dynamic symmetric quantization per token (row) and per group of `group` lanes.

    group >= K (rounded up to 32) means one scale per token. Padding lanes get code 0 (bits 0).
    An all-zero group has scale 0 and codes round((0 + 2^q - 1) / 2) (half to even), like any other.
    """
    bits = _check_bits(bits, "abits")
    x = np.asarray(x, np.float64)
    if x.ndim != 2:
        raise ValueError(f"activations must be 2-D (M, K), got shape {x.shape}")
    K = x.shape[1]
    group = min(_check_group(group, "agroup"), round_up(K, LANES))
    g, Kp = _grouped(x, group)
    s = np.abs(g).max(-1) / ((1 << bits) - 1)
    # an all-zero group gets scale 0 (bipolar codes have no zero; the scale makes the group exact)
    codes = codes_of(g, np.where(s > 0, s, 1.0)[..., None], bits).reshape(x.shape[0], Kp)
    codes[:, K:] = 0
    return QuantTensor(codes, s.astype(np.float32), None, bits, group, K)


def pack_planes(codes: np.ndarray, bits: int) -> np.ndarray:
    """codes (N, Kp) uint8 -> planes uint32 (bits, N, Kp//32), MSB plane first, lane k = bit k%32."""
    bits = _check_bits(bits)
    N, Kp = codes.shape
    if Kp % LANES:
        raise ValueError(f"packed K must be a multiple of {LANES}, got {Kp}")
    shifts = np.arange(LANES, dtype=np.uint64)
    out = np.empty((bits, N, Kp // LANES), np.uint32)
    c = codes.reshape(N, Kp // LANES, LANES).astype(np.uint64)
    for r in range(bits):
        plane_bits = (c >> np.uint64(bits - 1 - r)) & np.uint64(1)
        out[r] = (plane_bits << shifts).sum(-1).astype(np.uint32)
    return out


def unpack_planes(planes: np.ndarray) -> np.ndarray:
    """Inverse of pack_planes: planes (p, N, W) -> codes (N, 32*W) uint8."""
    p, N, W = planes.shape
    lanes = (planes[..., None] >> np.arange(LANES, dtype=np.uint32)) & 1     # (p, N, W, 32)
    weights = (1 << np.arange(p - 1, -1, -1)).astype(np.uint32)
    return np.tensordot(weights, lanes, axes=(0, 0)).reshape(N, W * LANES).astype(np.uint8)


@dataclass
class PackedLinear:
    """A linear weight in the canonical packed layout of docs/DESIGN.md (W is N outputs x K inputs).

    Group parameters come in one of two forms: float32 `scales` / `offsets` per group of G lanes, or
    (`sub`, loader/kquant.py) the two-level form of an exact GGUF import: float16 d, dmin per super-block
    and small integer sub-scales per group of G = 16 or 32 lanes. With `sub`, reading `scales` or
    `offsets` computes float32 arrays on the fly (not kept: that would cost more than the weight's codes
    at W4); consumers that can, read `sub` instead."""
    planes: np.ndarray                 # uint32 (p, N, Kp//32), MSB plane first
    scales: np.ndarray | None          # float32 (N, Kp//G); None when sub is set
    offsets: np.ndarray | None         # float32 (N, Kp//G) or None
    bits: int
    group: int
    K: int
    N: int
    smooth: np.ndarray | None = None   # float32 (K,): activations are divided by it
    rotate: int = 0                    # W R stored: the engine feeds R x (loader/rotation.py); 0: none
    sub: SubScales | None = None       # two-level parameters (then scales / offsets are derived)

    def __post_init__(self):
        p, N, W = self.planes.shape
        if self.planes.dtype != np.uint32:
            raise FormatError(f"planes must be uint32, got {self.planes.dtype}")
        if p != self.bits or N != self.N:
            raise FormatError(f"planes shape {self.planes.shape} disagrees with bits={self.bits}, N={self.N}")
        Kp = W * LANES
        if Kp % self.group or Kp < self.K or Kp - self.K >= max(self.group, LANES):
            raise FormatError(f"planes width {Kp} does not fit K={self.K} padded to group {self.group}")
        if self.sub is not None:
            if self._scales is not None or self._offsets is not None:
                raise FormatError("a linear has float32 scales/offsets or two-level sub-scales, not both")
            if self.sub.G != self.group or Kp % self.sub.S or self.sub.d.shape != (N, Kp // self.sub.S):
                raise FormatError(f"sub-scales {self.sub.d.shape} (G={self.sub.G}, S={self.sub.S}) do not fit "
                                  f"N={N}, Kp={Kp}, group={self.group}")
            return
        if self._scales is None or self._scales.shape != (N, Kp // self.group):
            raise FormatError(f"scales shape {None if self._scales is None else self._scales.shape}, "
                              f"expected {(N, Kp // self.group)}")
        if self._offsets is not None and self._offsets.shape != self._scales.shape:
            raise FormatError(f"offsets shape {self._offsets.shape}, expected {self._scales.shape}")

    @property
    def Kp(self) -> int:
        return self.planes.shape[2] * LANES

    @classmethod
    def from_quant(cls, q: QuantTensor, smooth: np.ndarray | None = None, rotate: int = 0,
                   sub: SubScales | None = None) -> "PackedLinear":
        """sub: the exact two-level parameters of q (then q's float32 scales / offsets are not kept)."""
        if sub is not None:
            return cls(pack_planes(q.codes, q.bits), None, None, q.bits, q.group, q.K, q.codes.shape[0],
                       smooth, rotate, sub)
        return cls(pack_planes(q.codes, q.bits), q.scales.astype(np.float32),
                   None if q.offsets is None else q.offsets.astype(np.float32),
                   q.bits, q.group, q.K, q.codes.shape[0], smooth, rotate)

    def to_quant(self) -> QuantTensor:
        return QuantTensor(unpack_planes(self.planes), self.scales, self.offsets, self.bits, self.group, self.K)

    def nested(self, k: int) -> "PackedLinear":
        """The k-bit weight made of the top k planes: codes >> (p-k), scale * 2^(p-k), same offset."""
        k = _check_bits(k, "nested bits")
        if k > self.bits:
            raise ValueError(f"cannot run a {self.bits}-bit weight at {k} bits")
        if k == self.bits:
            return self
        if self.sub is not None:
            return PackedLinear(self.planes[:k], None, None, k, self.group, self.K, self.N, self.smooth,
                                self.rotate, self.sub.scaled(self.bits - k))
        return PackedLinear(self.planes[:k], (self.scales * (1 << (self.bits - k))).astype(np.float32),
                            self.offsets, k, self.group, self.K, self.N, self.smooth, self.rotate)

    def row_params(self, ids, take=None) -> tuple[np.ndarray, np.ndarray | None]:
        """float32 (scales, offsets) of rows `ids` only (an embedding lookup must not compute them all);
        take(a, ids): how to gather rows (see SubScales.take)."""
        if self.sub is not None:
            return self.sub.take(ids, take).params()
        t = (lambda a: a[ids]) if take is None else (lambda a: take(a, ids))
        return t(self.scales), None if self.offsets is None else t(self.offsets)

    def dequantize(self) -> np.ndarray:
        """float64 (N, K). Two-level: exactly a*q - a*zq - b (so its float32 rounding is the source
        format's own dequantization, docs/DESIGN.md)."""
        if self.sub is None:
            return self.to_quant().dequantize()
        a, b = self.sub.affine64()
        v = values_of(unpack_planes(self.planes), self.bits).astype(np.float64)
        G = self.group
        w = np.repeat(a / 2, G, axis=1) * v + np.repeat(self.sub.c0 * a - b, G, axis=1)
        return w[:, :self.K]

    @property
    def nbytes(self) -> int:
        if self.sub is not None:
            return self.planes.nbytes + self.sub.nbytes
        extra = 0 if self.offsets is None else self.offsets.nbytes
        return self.planes.nbytes + self.scales.nbytes + extra


def _derived(kind: int):
    """Property for PackedLinear.scales / .offsets: the stored float32 array, or one computed from the
    two-level form (sub). The dataclass __init__ assigns through the setter."""
    attr = ("_scales", "_offsets")[kind]

    def get(self):
        v = self.__dict__.get(attr)
        if v is None and self.__dict__.get("sub") is not None:
            return self.sub.params()[kind]
        return v

    def put(self, value):
        self.__dict__[attr] = value
    return property(get, put)


PackedLinear.scales = _derived(0)
PackedLinear.offsets = _derived(1)


def can_concat_rows(lins: list["PackedLinear"]) -> bool:
    """Whether linears can be stacked along N: same K, bits, group, parameter form (two-level ones the
    same sub-block form, see concat_subscales), offsets and smoothing."""
    a = lins[0]
    key = lambda x: (x.K, x.bits, x.group, x.sub is None, x.smooth is None, x.rotate,
                     x.sub is None and x.offsets is None)
    if any(key(x) != key(a) or (x.smooth is not None and not np.array_equal(x.smooth, a.smooth)) for x in lins):
        return False
    return a.sub is None or subscales_agree([x.sub for x in lins])


def concat_rows(lins: list["PackedLinear"]) -> "PackedLinear | None":
    """Stack linears along N when can_concat_rows (the fused q|k|v and gate|up of the engine); None when
    they cannot be."""
    if not can_concat_rows(lins):
        return None
    a = lins[0]
    planes = np.concatenate([x.planes for x in lins], axis=1)
    N = sum(x.N for x in lins)
    if a.sub is not None:
        return PackedLinear(planes, None, None, a.bits, a.group, a.K, N, a.smooth, a.rotate,
                            concat_subscales([x.sub for x in lins]))
    return PackedLinear(planes, np.concatenate([x.scales for x in lins], axis=0),
                        None if a.offsets is None else np.concatenate([x.offsets for x in lins], axis=0),
                        a.bits, a.group, a.K, N, a.smooth, a.rotate)


@dataclass(frozen=True)
class LinearShape:
    """A PackedLinear without its planes: what a backend keeps once it holds its own tiles of them (the
    planes of fused q|k|v and gate|up are a concatenated copy, 2.3 GB at 7B shapes). Reading .planes
    from it is an AttributeError, never a silent guess. With two-level parameters (sub), scales and
    offsets are derived on read as in PackedLinear, and `group` may be the kernels' group (a backend
    passes the super-block S there, see runtime/cpu/backend.py)."""
    scales: np.ndarray | None
    offsets: np.ndarray | None
    bits: int
    group: int
    K: int
    N: int
    Kp: int
    smooth: np.ndarray | None = None
    rotate: int = 0
    sub: SubScales | None = None

    @classmethod
    def of(cls, lin: PackedLinear, group: int | None = None) -> "LinearShape":
        if lin.sub is not None:
            return cls(None, None, lin.bits, group or lin.group, lin.K, lin.N, lin.Kp, lin.smooth, lin.rotate,
                       lin.sub)
        return cls(lin.scales, lin.offsets, lin.bits, lin.group, lin.K, lin.N, lin.Kp, lin.smooth, lin.rotate)


LinearShape.scales = _derived(0)
LinearShape.offsets = _derived(1)


# ---- reference products (float64, straight from the definitions; no popcount tricks) ----------

def ref_linear_a16(lin: PackedLinear, x: np.ndarray) -> np.ndarray:
    """y = x @ W^T with W dequantized in float64. x (M, K) -> (M, N) float64."""
    x = np.asarray(x, np.float64)
    if lin.smooth is not None:
        x = x / lin.smooth
    return x @ lin.dequantize().T


def ref_linear_quant(lin: PackedLinear, x: np.ndarray, abits: int, agroup: int | None = None) -> np.ndarray:
    """y = Q(x) @ W^T where Q quantizes activations per token/group as the backends do. float64."""
    x = np.asarray(x, np.float64)
    if lin.smooth is not None:
        x = x / lin.smooth
    qa = quantize_activations(x, abits, lin.group if agroup is None else agroup)
    return qa.dequantize() @ lin.dequantize().T


def popcount_dot(wplanes: np.ndarray, aplanes: np.ndarray, n_valid: int, K_lanes: int) -> int:
    """Integer v.u over one block via the AND form of SPEC.md: planes (p, W) and (q, W) uint32.

    Pad lanes carry bit 0 in both operands, so each contributes +1 to the popcount form; using the
    number of valid lanes instead of the block width removes them exactly.
    """
    del K_lanes
    p, q = wplanes.shape[0], aplanes.shape[0]
    pc = np.vectorize(lambda v: bin(int(v)).count("1"))
    total = 0
    for r in range(p):
        pw = int(pc(wplanes[r]).sum())
        for t in range(q):
            pa = int(pc(aplanes[t]).sum())
            both = int(pc(wplanes[r] & aplanes[t]).sum())
            total += (1 << (p - 1 - r)) * (1 << (q - 1 - t)) * (4 * both - 2 * pw - 2 * pa + n_valid)
    return total
