/* A16 product by integer dot products: weight codes times 16-bit activations (used from
 * I8_MIN_BITS[isa] bits in backend.py: every precision with AVX-512 VNNI, from 3 bits on AVX2).
 *
 * Why: the table kernel (kernels_linear.c) costs one pass of ~23 vector ops per 64 bytes per bit plane;
 * vpdpbusd does 64 multiply-adds in one op, so the integer product is cheaper from 1 bit on (measured,
 * backend.py). The codes c in [0, 2^p) are packed cw = 2, 4 or 8 bits each (layout.codes_tiles), tiled
 * [Nt][Q][64 rows][4 bytes], so one 32-bit lane holds 4 consecutive lanes of one row per container
 * slot; unpacking is a shift and a mask per slot.
 *
 * Activations are quantized per table block of L lanes (ab_a16_block(G), <= 256, never crossing a weight
 * group) to integers x16 = rint(x / sx), sx = max|x| / XQ (XQ = 32639), so every element is as fine as a
 * 16-bit table entry (the table path rounds 4-lane sums with a step of max(4-lane sum) / 32767 >= sx).
 * Per block and row the kernel forms the exact integer
 *     D = sum_k v_k * x16_k = 2 * sum_k c_k * x16_k - (2^p - 1) * sum_k x16_k          (v = 2c - (2^p - 1))
 * whose magnitude is at most 256 * 255 * 32639 < 2^31, so wrapping 32-bit arithmetic gives it exactly,
 * whatever the intermediate values. AVX-512 splits x16 = 256*xh + xl into two signed bytes (|x16| <=
 * 32639 keeps xh <= 127) and uses vpdpbusd (u8 x s8, 4 products per lane); AVX2 widens the codes to 16
 * bits and uses vpmaddwd; the portable path multiplies in C. All three produce the same D. Then, as in
 * the table path, y += D * (s_w * sx) per block and y += o * sum_g(x) at each group end (x in float).
 */
#include <immintrin.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>
#include "ab_i8.h"

/* Sum of x[k0..k0+G) (zero past K) in double, in a fixed order that every isa path reproduces: eight
 * lanes (lane l adds x[k0 + l + 8i] in turn), then ((l0+l1)+(l2+l3))+((l4+l5)+(l6+l7)). */
static double group_sum_portable(const float *x, int k0, int G, int K) {
    double l[8] = {0, 0, 0, 0, 0, 0, 0, 0};
    for (int k = k0; k < k0 + G; k += 8)
        for (int e = 0; e < 8; e++) l[e] += k + e < K ? (double)x[k + e] : 0.0;
    return ((l[0] + l[1]) + (l[2] + l[3])) + ((l[4] + l[5]) + (l[6] + l[7]));
}

/* One activation row: x16, its byte halves, block scales, (2^p-1) * block sums, group sums. */
static void i8_quantize_row_portable(const i8_ctx *c, int m) {
    const float *x = c->x + (size_t)m * c->K;
    int16_t *q16 = c->x16 + (size_t)m * c->Kp;
    int8_t *qh = c->xh + (size_t)m * c->Kp, *ql = c->xl + (size_t)m * c->Kp;
    uint32_t P1 = (1u << c->p) - 1;
    for (int b = 0; b < c->nb; b++) {
        int k0 = b * c->L, k1 = k0 + c->L;
        float mx = 0.0f;
        for (int k = k0; k < k1 && k < c->K; k++) mx = fabsf(x[k]) > mx ? fabsf(x[k]) : mx;
        float inv = mx > 0.0f ? XQ / mx : 0.0f;
        c->sx[(size_t)m * c->nb + b] = mx / XQ;
        int32_t sum = 0;
        for (int k = k0; k < k1; k++) {
            float r = k < c->K ? rintf(x[k] * inv) : 0.0f;
            r = r > XQ ? XQ : (r < -XQ ? -XQ : r);
            int q = (int)r, h = (q + 128) >> 8;
            q16[k] = (int16_t)q;
            qh[k] = (int8_t)h;
            ql[k] = (int8_t)(q - 256 * h);
            sum += q;
        }
        c->px[(size_t)m * c->nb + b] = (int32_t)((uint32_t)sum * P1);
    }
    for (int g = 0; g < c->ng; g++) c->gs[(size_t)m * c->ng + g] = (float)group_sum_portable(x, g * c->G, c->G, c->K);
}

/* The same row in AVX-512, bit for bit: max, x * inv, round-half-even, clamp and the integer split are
 * exact elementwise operations, and the group sums keep the eight-lane order above. Serial in decode
 * (one row), so its speed shows directly in the time per token. */
/* Lanes k..k+15 that lie below both the block end e and the valid length K. */
AB_INLINE __mmask16 lanes16(int k, int e, int K) {
    int n = (e < K ? e : K) - k;
    return n >= 16 ? (__mmask16)0xFFFF : n <= 0 ? (__mmask16)0 : (__mmask16)((1u << n) - 1);
}

/* Group k4 of a row in xi (at ab_xi_row): its 4 high and 4 low bytes. */
static inline void xi_put(int8_t *row, int k4, const int8_t *h, const int8_t *l) {
    memcpy(row + (size_t)k4 * 64, h, 4);
    memcpy(row + (size_t)k4 * 64 + 32, l, 4);
}

/* Groups g0 .. g1-1 of row m (their blocks: a block never crosses a group). */
AB_AVX512 static void i8_quantize_part_avx512(const i8_ctx *c, int m, int g0, int g1) {
    const float *x = c->x + (size_t)m * c->K;
    int16_t *q16 = c->x16 + (size_t)m * c->Kp;
    int8_t *qh = c->xh + (size_t)m * c->Kp, *ql = c->xl + (size_t)m * c->Kp;
    uint32_t P1 = (1u << c->p) - 1;
    int8_t *xi = c->xi ? ab_xi_row(c, m) : NULL;
    const __m512 hi = _mm512_set1_ps(XQ), lo = _mm512_set1_ps(-XQ);
    for (int b = g0 * c->G / c->L; b < g1 * c->G / c->L; b++) {
        int k0 = b * c->L;
        __m512 vm = _mm512_setzero_ps();
        for (int k = k0; k < k0 + c->L; k += 16)   /* L is a multiple of 8, not always of 16 */
            vm = _mm512_max_ps(vm, _mm512_abs_ps(_mm512_maskz_loadu_ps(lanes16(k, k0 + c->L, c->K), x + k)));
        float mx = _mm512_reduce_max_ps(vm);
        float inv = mx > 0.0f ? XQ / mx : 0.0f;
        c->sx[(size_t)m * c->nb + b] = mx / XQ;
        __m512 vinv = _mm512_set1_ps(inv);
        __m512i vsum = _mm512_setzero_si512();
        for (int k = k0; k < k0 + c->L; k += 16) {
            __mmask16 st = lanes16(k, k0 + c->L, k0 + c->L);    /* padding past K is stored as code 0 */
            __m512 r = _mm512_roundscale_ps(_mm512_mul_ps(_mm512_maskz_loadu_ps(lanes16(k, k0 + c->L, c->K), x + k), vinv),
                                            _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
            r = _mm512_max_ps(_mm512_min_ps(r, hi), lo);
            __m512i q = _mm512_cvtps_epi32(r);
            __m512i h = _mm512_srai_epi32(_mm512_add_epi32(q, _mm512_set1_epi32(128)), 8);
            __m512i l = _mm512_sub_epi32(q, _mm512_slli_epi32(h, 8));
            if (!xi) {
                _mm512_mask_cvtepi32_storeu_epi16(q16 + k, st, q);
                _mm512_mask_cvtepi32_storeu_epi8(qh + k, st, h);
                _mm512_mask_cvtepi32_storeu_epi8(ql + k, st, l);
            } else {        /* only the batched tile's interleaved bytes (the one reader of this row) */
                int8_t hb[16], lb[16];
                _mm_storeu_si128((__m128i *)hb, _mm512_cvtepi32_epi8(h));
                _mm_storeu_si128((__m128i *)lb, _mm512_cvtepi32_epi8(l));
                for (int e = 0; e < 4 && k + 4 * e < k0 + c->L; e++)       /* the block's groups only */
                    xi_put(xi, k / 4 + e, hb + 4 * e, lb + 4 * e);
            }
            vsum = _mm512_add_epi32(vsum, q);
        }
        c->px[(size_t)m * c->nb + b] = (int32_t)((uint32_t)_mm512_reduce_add_epi32(vsum) * P1);
    }
    for (int g = g0; g < g1; g++) {
        __m512d acc = _mm512_setzero_pd();
        for (int k = g * c->G; k < (g + 1) * c->G; k += 8) {
            __mmask8 mk = k + 8 <= c->K ? 0xFF : k >= c->K ? 0 : (__mmask8)((1u << (c->K - k)) - 1);
            acc = _mm512_add_pd(acc, _mm512_cvtps_pd(_mm256_maskz_loadu_ps(mk, x + k)));
        }
        double l[8];
        _mm512_storeu_pd(l, acc);
        c->gs[(size_t)m * c->ng + g] = (float)(((l[0] + l[1]) + (l[2] + l[3])) + ((l[4] + l[5]) + (l[6] + l[7])));
    }
}

static void i8_quantize_row(const i8_ctx *c, int m) {
    if (c->ar) ab_q8_quantize_row(c, m);      /* abits "q8": kernels_q8.c */
    else if (c->isa == AB_ISA_AVX512) i8_quantize_part_avx512(c, m, 0, c->ng);
    else i8_quantize_row_portable(c, m);
}

static void i8_tile_portable(const i8_ctx *c, int t, int m0, int mc) {
    float yacc[8][64];
    memset(yacc, 0, sizeof yacc);
    int per = 8 / c->cw, qpb = c->L / (4 * per), mask = (1 << c->cw) - 1;
    for (int b = 0; b < c->nb; b++) {
        const uint8_t *w = c->codes + ((size_t)t * (c->Kp / (4 * per)) + (size_t)b * qpb) * 256;
        float sb[64], ob[64];
        const float *wo, *ws = ab_gp_portable(c->wsc, c->woff, c->f16,
                                              ((size_t)t * c->ng + (size_t)b * c->L / c->G) * 64, sb, ob, &wo);
        for (int m = m0; m < m0 + mc; m++) {
            const int16_t *q = c->x16 + (size_t)m * c->Kp + (size_t)b * c->L;
            int32_t D[64];
            for (int i = 0; i < 64; i++) {
                int64_t s = 0;
                for (int j = 0; j < qpb; j++)
                    for (int u = 0; u < per; u++)
                        for (int e = 0; e < 4; e++)
                            s += (int64_t)(w[(size_t)j * 256 + 4 * i + e] >> (c->cw * u) & mask) *
                                 q[4 * (per * j + u) + e];
                D[i] = (int32_t)(uint32_t)(2 * (uint64_t)s - (uint32_t)c->px[(size_t)m * c->nb + b]);
            }
            i8_finish(c, m, b, ws, wo, D, yacc[m - m0]);
        }
    }
    for (int m = m0; m < m0 + mc; m++) ab_store_tile(c->y, c->N, t, m, yacc[m - m0]);
}

AB_AVX2 static void i8_tile_avx2(const i8_ctx *c, int t, int m0, int mc) {
    float yacc[8][64] __attribute__((aligned(32)));
    memset(yacc, 0, sizeof yacc);
    int per = 8 / c->cw, qpb = c->L / (4 * per);
    const __m128i mask = _mm_set1_epi8((char)((1 << c->cw) - 1));
    for (int b = 0; b < c->nb; b++) {
        const uint8_t *w = c->codes + ((size_t)t * (c->Kp / (4 * per)) + (size_t)b * qpb) * 256;
        int g = b * c->L / c->G;
        float sb[64] __attribute__((aligned(32))), ob[64] __attribute__((aligned(32)));
        const float *wo, *ws = ab_gp_avx2(c->wsc, c->woff, c->f16, ((size_t)t * c->ng + g) * 64, sb, ob, &wo);
        int gend = wo && ((b + 1) * c->L) % c->G == 0;
        for (int m = m0; m < m0 + mc; m++) {
            const int16_t *q = c->x16 + (size_t)m * c->Kp + (size_t)b * c->L;
            __m256i pv = _mm256_set1_epi32(c->px[(size_t)m * c->nb + b]);
            __m256 l = _mm256_set1_ps(c->sx[(size_t)m * c->nb + b]);
            for (int half = 0; half < 2; half++) {
                /* acc[i]: rows 32*half + 4i .. +3 as pairs (lanes 0-1, 2-3 of each row) */
                __m256i acc[8];
                for (int i = 0; i < 8; i++) acc[i] = _mm256_setzero_si256();
                for (int j = 0; j < qpb; j++) {
                    const uint8_t *wj = w + (size_t)j * 256 + 128 * half;
                    for (int u = 0; u < per; u++) {
                        int64_t xp;
                        memcpy(&xp, q + 4 * (per * j + u), 8);
                        __m256i xv = _mm256_set1_epi64x(xp);
                        for (int i = 0; i < 8; i++) {
                            __m128i raw = _mm_loadu_si128((const __m128i *)(wj + 16 * i));
                            if (per > 1) raw = _mm_and_si128(_mm_srli_epi16(raw, c->cw * u), mask);
                            __m256i wv = _mm256_cvtepu8_epi16(raw);
                            acc[i] = _mm256_add_epi32(acc[i], _mm256_madd_epi16(wv, xv));
                        }
                    }
                }
                for (int i = 0; i < 4; i++) {
                    /* hadd -> rows [0 1 4 5 | 2 3 6 7] of these 8; reorder 64-bit pairs to 0..7 */
                    __m256i I = _mm256_permute4x64_epi64(_mm256_hadd_epi32(acc[2 * i], acc[2 * i + 1]), 0xD8);
                    __m256i D = _mm256_sub_epi32(_mm256_slli_epi32(I, 1), pv);
                    int r = 32 * half + 8 * i;
                    __m256 sc = _mm256_mul_ps(_mm256_loadu_ps(ws + r), l);
                    __m256 ya = _mm256_load_ps(&yacc[m - m0][r]);
                    ya = _mm256_add_ps(ya, _mm256_mul_ps(_mm256_cvtepi32_ps(D), sc));
                    if (gend) {
                        __m256 s = _mm256_set1_ps(c->gs[(size_t)m * c->ng + g]);
                        ya = _mm256_add_ps(ya, _mm256_mul_ps(_mm256_loadu_ps(wo + r), s));
                    }
                    _mm256_store_ps(&yacc[m - m0][r], ya);
                }
            }
        }
    }
    for (int m = m0; m < m0 + mc; m++) ab_store_tile(c->y, c->N, t, m, yacc[m - m0]);
}

AB_AVX512 static void i8_tile_avx512(const i8_ctx *c, int t, int m0, int mc) {
    if (!c->xi) {        /* one row: the decode tile takes it (ab_i8_run gives xi otherwise) */
        ab_i8_tile_m1_avx512(c, t, m0);      /* decode: kernels_decode.c */
        return;
    }
    ab_i8_tile_rows_avx512(c, t, m0, mc);   /* kernels_batch.c */
}

static void i8_task(void *ctx, int task) {
    const i8_ctx *c = ctx;
    int r = task % c->nr, mb = task / c->nr;
    int m0 = mb * c->mbmax, mc = c->M - m0 < c->mbmax ? c->M - m0 : c->mbmax;
    int t0, t1;
    ab_range(c->Nt, c->nr, r, &t0, &t1);
    for (int t = t0; t < t1; t++) {
        if (c->kq) {
            if (c->isa == AB_ISA_AVX512) ab_kq_tile_avx512(c, t, m0, mc);
            else if (c->isa == AB_ISA_AVX2) ab_kq_tile_avx2(c, t, m0, mc);
            else ab_kq_tile_portable(c, t, m0, mc);
        } else if (c->isa == AB_ISA_AVX512) i8_tile_avx512(c, t, m0, mc);
        else if (c->isa == AB_ISA_AVX2) i8_tile_avx2(c, t, m0, mc);
        else i8_tile_portable(c, t, m0, mc);
    }
}

/* Tile ranges per call. Decode (M = 1) streams each weight once from memory: one contiguous range per
 * thread keeps every core's stream sequential (tiles handed out one by one interleave the two cores'
 * streams, and each core's prefetcher then runs into the other's tiles: measured 14 vs ~22 GB/s on two
 * cores). Up to 8 rows (batched decode: one row tile) also read each weight once, in 4 ranges per thread
 * (computing longer, they balance on more pieces: measured ~5% faster per step than single tiles). Larger
 * M reuses tiles from cache, and single tiles balance better there. */
int ab_i8_ranges(ab_pool *pool, int Nt, int M) {
    int nt = ab_pool_threads(pool);
    if (M > 8 || nt <= 1) return Nt;
    int nr = nt * (M > 1 ? 4 : AB_RANGES_PER_THREAD);
    return nr < Nt ? nr : Nt;
}

/* One row quantized; with the batched tile, also its bytes in the interleaved layout xi (ab_i8.h). */
static void i8_quant_row(const i8_ctx *c, int m) {
    i8_quantize_row(c, m);
    if (c->xi && c->ar) {
        const int8_t *qh = c->xh + (size_t)m * c->Kp, *ql = c->xl + (size_t)m * c->Kp;
        for (int k4 = 0; k4 < c->Kp / 4; k4++) xi_put(ab_xi_row(c, m), k4, qh + 4 * k4, ql + 4 * k4);
    }
}

/* Task: one row; with the batched tile, a slice of groups of 8 rows (the rows of one 64-byte line of xi
 * on one core: rows on two cores writing into the same lines made the quantization several times slower;
 * slices let both cores quantize a decode batch's 8 rows). abits "q8" fills xi from whole rows. */
static void i8_quant_task(void *ctx, int task) {
    const i8_ctx *c = ctx;
    if (!c->xi) {
        i8_quant_row(c, task);
        return;
    }
    int slab = task / c->qsl, sl = task % c->qsl, g0, g1;
    ab_range(c->ng, c->qsl, sl, &g0, &g1);
    for (int m = 8 * slab; m < 8 * slab + 8 && m < c->M; m++) {
        if (c->ar) i8_quant_row(c, m);
        else i8_quantize_part_avx512(c, m, g0, g1);
    }
}

/* Scratch bytes ab_i8_run needs for M rows of Kp lanes. */
size_t ab_i8_scratch(int M, int Kp) {       /* blocks and groups down to 16 lanes (two-level weights) */
    return (size_t)M * ((size_t)Kp * 4 + (size_t)Kp / 16 * 8 + (size_t)Kp / 16 * 4)
           + (size_t)(M + 7) / 8 * 8 * Kp * 2 + 7 * 64;
}

static inline void *carve(uintptr_t *s, size_t n) {
    uintptr_t p = (*s + 63) & ~(uintptr_t)63;
    *s = p + n;
    return (void *)p;
}

int ab_i8_run(ab_pool *pool, int isa, const uint8_t *codes, const void *wsc, const void *woff, int f16,
              int p, int cw, int N, int Kp, int G, const float *x, int M, int K, int ar, float *y, void *scratch) {
    const ab_kq *kq = f16 == AB_F16_KQ ? (const ab_kq *)wsc : NULL;
    if (kq && !ab_kq_ok(kq, Kp)) return -3;
    if (!kq && (f16 < 0 || AB_F16_R(f16) > 255 || AB_F16_ZK(f16) > 256 || (AB_F16_ZK(f16) && !AB_F16_R(f16)) ||
                !(cw == 2 || cw == 4 || cw == 8) || p > cw))
        return -3;
    if (p < 1 || p > 8 || G <= 0 || G % 32 || Kp % G || K > Kp || M < 0 || N < 0) return -3;
    if (M == 0 || N == 0) return 0;
    i8_ctx c;
    c.codes = codes; c.wsc = wsc; c.woff = woff; c.f16 = f16; c.x = x; c.y = y; c.kq = kq;
    if (kq) G = kq->G;      /* the parameters' groups (and the blocks) are the sub-blocks */
    if (kq && kq->nparts == 1 && kq->cw[0] >= 2) {
        /* one part: the codes are the plain cw-bit tiles, and the plain tile loops read the two-level
         * parameters through ab_gp_* (the same floats as the part-combining path) */
        cw = kq->cw[0];
        c.kq = kq = NULL;
    }
    c.p = p; c.cw = cw; c.N = N; c.Kp = Kp; c.G = G; c.L = ab_i8_block(G, ar); c.ng = Kp / G; c.nb = Kp / c.L;
    c.M = M; c.K = K; c.Nt = (N + 63) / 64; c.isa = isa; c.mbmax = 8; c.ar = ar;
    if (c.L < 0) return -3;
    void *own = NULL;
    if (!scratch) {
        if (posix_memalign(&own, 64, ab_i8_scratch(M, Kp))) return -1;
        scratch = own;
    }
    uintptr_t s = (uintptr_t)scratch;
    c.x16 = carve(&s, (size_t)M * Kp * 2);
    c.xh = carve(&s, (size_t)M * Kp);
    c.xl = carve(&s, (size_t)M * Kp);
    c.sx = carve(&s, (size_t)M * c.nb * 4);
    c.px = carve(&s, (size_t)M * c.nb * 4);
    c.gs = carve(&s, (size_t)M * c.ng * 4);
    /* the batched tile's interleaved bytes: for more than one row, or one row the decode tile does not take */
    int rows_tile = isa == AB_ISA_AVX512 && !kq && (M > 1 || ((f16 & AB_F16_KQ) && c.L != c.G));
    c.xi = rows_tile ? carve(&s, (size_t)(M + 7) / 8 * 8 * Kp * 2) : NULL;
    if (M == 1) i8_quant_row(&c, 0);
    else {
        c.qsl = c.xi && !c.ar && c.ng > 1 ? ab_pool_threads(pool) : 1;
        c.qsl = c.qsl < c.ng ? c.qsl : c.ng;
        ab_pool_run(pool, i8_quant_task, &c, c.xi ? (M + 7) / 8 * c.qsl : M);
    }
    c.nr = ab_i8_ranges(pool, c.Nt, M);
    ab_pool_run(pool, i8_task, &c, c.nr * ((M + c.mbmax - 1) / c.mbmax));
    free(own);
    return 0;
}

int ab_linear_i8(ab_pool *pool, int isa, const uint8_t *codes, const void *wsc, const void *woff, int f16,
                 int p, int cw, int N, int Kp, int G, const float *x, int M, int K, float *y) {
    if (isa < 0 || isa > AB_ISA_AVX512 || !(ab_isa_available() >> isa & 1)) return -2;
    return ab_i8_run(pool, isa, codes, wsc, woff, f16, p, cw, N, Kp, G, x, M, K, 0, y, NULL);
}

/* The quantized activations of one row, for tests: x16 (Kp), block scales (Kp/L), group sums (Kp/G). */
int ab_i8_quantize(int isa, const float *x, int K, int Kp, int G, int16_t *x16, float *sx, float *gs) {
    return ab_i8_quantize_q8(isa, x, K, Kp, G, 0, x16, sx, gs);
}

int ab_i8_quantize_q8(int isa, const float *x, int K, int Kp, int G, int ar, int16_t *x16, float *sx, float *gs) {
    if (isa < 0 || isa > AB_ISA_AVX512 || !(ab_isa_available() >> isa & 1)) return -2;
    if (G <= 0 || (G % 32 && !(ar && G == 16)) || Kp % G || K > Kp || ab_i8_block(G, ar) < 0) return -3;
    void *buf = NULL;
    if (posix_memalign(&buf, 64, ab_i8_scratch(1, Kp))) return -1;
    i8_ctx c;
    memset(&c, 0, sizeof c);
    c.isa = isa; c.x = x; c.p = 8; c.Kp = Kp; c.G = G; c.L = ab_i8_block(G, ar); c.ng = Kp / G; c.nb = Kp / c.L; c.M = 1;
    c.K = K; c.ar = ar;
    uintptr_t s = (uintptr_t)buf;
    c.x16 = carve(&s, (size_t)Kp * 2);
    c.xh = carve(&s, (size_t)Kp);
    c.xl = carve(&s, (size_t)Kp);
    c.sx = carve(&s, (size_t)c.nb * 4);
    c.px = carve(&s, (size_t)c.nb * 4);
    c.gs = carve(&s, (size_t)c.ng * 4);
    i8_quantize_row(&c, 0);
    memcpy(x16, c.x16, (size_t)Kp * 2);
    memcpy(sx, c.sx, (size_t)c.nb * 4);
    memcpy(gs, c.gs, (size_t)c.ng * 4);
    free(buf);
    return 0;
}
