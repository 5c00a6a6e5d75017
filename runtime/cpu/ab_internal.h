/* Declarations shared by the C files of the CPU backend (not seen by cffi). */
#ifndef AB_INTERNAL_H
#define AB_INTERNAL_H
#include <stdint.h>
#include <stddef.h>
#include "anybit_cpu.h"

#define AB_ISA_PORTABLE 0
#define AB_ISA_AVX2 1
#define AB_ISA_AVX512 2

/* Run fn(ctx, i) for i in [0, ntasks) on the pool's threads (the caller takes part); returns when all
 * tasks are done. Calls from several host threads are serialised. */
typedef void (*ab_task_fn)(void *ctx, int task);
void ab_pool_run(ab_pool *pool, ab_task_fn fn, void *ctx, int ntasks);

/* A16 product with caller-provided scratch (NULL: allocate); isa must already be checked. */
size_t ab_a16_scratch(int M, int Kp);
int ab_a16_run(ab_pool *pool, int isa, const uint8_t *wl, const float *wsc, const float *woff,
               int p, int N, int Kp, int G, const float *x, int M, int K, float *y, void *scratch);

size_t ab_i8_scratch(int M, int Kp);
#ifndef AB_RANGES_PER_THREAD
#define AB_RANGES_PER_THREAD 1
#endif
int ab_i8_ranges(ab_pool *pool, int Nt, int M);
/* Tiles [*t0, *t1) of range r when Nt tiles are split into nr contiguous ranges. */
static inline void ab_range(int Nt, int nr, int r, int *t0, int *t1) {
    *t0 = (int)((int64_t)Nt * r / nr);
    *t1 = (int)((int64_t)Nt * (r + 1) / nr);
}
/* ar: 0, or the block of llama.cpp's 8-bit activation grid the input is rounded to first (abits "q8"). */
int ab_i8_run(ab_pool *pool, int isa, const uint8_t *codes, const void *wsc, const void *woff, int f16,
              int p, int cw, int N, int Kp, int G, const float *x, int M, int K, int ar, float *y, void *scratch);

size_t ab_qd_scratch(int M, int Kp);
int ab_qd_run(ab_pool *pool, int isa, const uint8_t *codes, const int32_t *wpw, const void *wsc, const void *woff,
              int f16, int p, int cw, int N, int Kp, int G, int q, int Ga, int L, const float *x, const float *smooth,
              int M, int K, float *y, float *ascales, int64_t *dbg_I, int64_t *dbg_U, void *scratch);

/* RoPE split in two (kernels_ops.c): the table once per step, then applied per rope op. */
void ab_rope_table(const int32_t *pos, int M, int n_rot, float theta, const float *freqs, double *cs, double *sn);
void ab_rope_apply(ab_pool *pool, float *x, int M, int H, int hd, int style, const double *cs, const double *sn);
void ab_rope_apply_partial(ab_pool *pool, float *x, int M, int H, int hd, int n_rot, int style, const double *cs,
                           const double *sn);

#define AB_INLINE static inline __attribute__((always_inline))
#define AB_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl,avx512vpopcntdq,avx512vbmi,avx512vnni,popcnt")))
#define AB_AVX2 __attribute__((target("avx2,fma,popcnt,f16c")))

/* Group parameters of 64 tiled rows (index `at` into the [Nt][ng][64] arrays) as float32 scale s and
 * offset o (*wo NULL when symmetric). f16 = 0: float32 arrays, used in place. f16 = r > 0 (an odd
 * integer <= 255): float16 arrays of a = 2s and z = o - r*s, half the bytes (z is the weight of code
 * (P1 - r)/2: r = P1 for code 0; a Q4_1 source imported at p = 8 has codes shifted by 120 and takes
 * r = 15, z = m). backend.py (f16_params) picks this only where s = 0.5f*a and o = z + r*s (r*s exact in
 * float32: 8 x 11 significant bits, then one rounding) reproduce the stored float32 s and o bit for bit,
 * so f16 and f32 handles give the same y, and every isa converts exactly (F16C / AVX-512 cvtph, or the
 * portable converter below).
 * f16 = r | k << 16 with k > 0 (a power of two): no z array, z = -k * a (exact). Q4_0 imports have
 * z = -8d = -8a, Q8_0 ones -128a: not storing z saves 2 of the 20 bytes read per 32 weights at W4. */
#define AB_F16_R(f) ((f) & 0xFFFF)
#define AB_F16_ZK(f) ((f) >> 16)
#include <string.h>
#include <immintrin.h>

/* f16 = AB_F16_KQ: two-level group parameters (loader/kquant.py SubScales, runtime/cpu/layout.py
 * kq_blob). wsc points to an ab_kq header followed by its arrays, woff is NULL; the G a kernel is called
 * with is the super-block S (a multiple of 32) and the groups of the parameters are the header's G = 16
 * or 32 lanes. Per 64 tiled rows: a = d * sc, s = 0.5f * a, o = c0 * a - dmin * m, with d, dmin float16
 * [Nt][Kp/S][64] and sc, m 8-bit [Nt][Kp/G][64] (sc absent: 1; m absent: 1; dmin absent: b = 0; nib: sc
 * holds sc | m << 4). Every product is exact in float32 (11 + 8 significant bits times at most 5), so o
 * has one rounding, that of the subtraction, on every isa (SubScales.params gives the same floats).
 * The byte-code A16 kernel (kernels_int8.c) reads the codes in parts of cw[r] = 1, 2, 4 or 8 bits each
 * (code = sum of part r << shift[r]; 5 bits = 4 + 1, 6 = 4 + 2, 3 = 2 + 1), so no code of 5 or 6 bits
 * sits in an 8-bit container: per tile qtot chunks of 256 bytes, part r from chunk qoff[r], chunk j of
 * a part holding lanes 4*(per*j + u) + e in bits [cw*u, cw*u + cw) of byte e of each row's 4 bytes. */
#define AB_F16_KQ (1 << 30)
#define AB_KQ_MAGIC 0x3151424B
#define AB_KQ_SC 1
#define AB_KQ_DMIN 2
#define AB_KQ_M 4
#define AB_KQ_NIB 8
#define AB_KQ_SIGNED 16
/* 6-bit sc and m (Q4_K, Q5_K) at the source's 12 bits per sub-block: with AB_KQ_NIB the sc array holds
 * their low nibbles (sc & 15 | (m & 15) << 4) and the m array their high bits, 32 bytes per 64 rows:
 * byte j = row j's (sc >> 4 | (m >> 4) << 2) in its low nibble, row j + 32's in its high nibble. Reading
 * 8 bits of each instead of 6 made a 7B-shaped Q4_K model 2.7% larger than its file, and decode, bound
 * by memory, 3% slower than llama.cpp's. */
#define AB_KQ_HI 32
typedef struct {
    int32_t magic, G, S, flags;
    float c0;
    int32_t ng, nsb, nparts;
    int64_t off_d, off_dmin, off_sc, off_m;
    int32_t qtot, cw[3], shift[3], qoff[3];
} ab_kq;

AB_INLINE int ab_kq_ok(const ab_kq *k, int Kp) {
    if (!k || k->magic != AB_KQ_MAGIC || !(k->G == 16 || k->G == 32) || k->S % k->G || k->S % 32 ||
        Kp % k->S || k->ng != Kp / k->G || k->nsb != Kp / k->S || k->nparts < 1 || k->nparts > 3)
        return 0;
    int lanes = 0;
    for (int r = 0; r < k->nparts; r++) {
        int cw = k->cw[r];
        if (!(cw == 1 || cw == 2 || cw == 4 || cw == 8) || k->shift[r] < 0 || k->shift[r] + cw > 8) return 0;
        lanes += cw;
    }
    return lanes <= 8;
}

AB_INLINE float ab_h2f(uint16_t h);

/* Where the two-level parameters of group g (of G lanes) of the 64 rows of tile t live: the float16 d
 * and dmin of their super-block, the 8-bit sub-scales and mins of their sub-block. */
typedef struct {
    const uint16_t *d, *dm;
    const uint8_t *sc, *m;
} ab_kq_ptrs;

static inline ab_kq_ptrs ab_kq_at(const ab_kq *k, size_t t, int g) {
    const uint8_t *base = (const uint8_t *)k;
    int J = g * k->G / k->S;
    ab_kq_ptrs p = {(const uint16_t *)(base + k->off_d) + ((size_t)t * k->nsb + J) * 64,
                    (const uint16_t *)(base + k->off_dmin) + ((size_t)t * k->nsb + J) * 64,
                    base + k->off_sc + ((size_t)t * k->ng + g) * 64,
                    base + k->off_m + ((size_t)t * k->ng + g) * (k->flags & AB_KQ_HI ? 32 : 64)};
    return p;
}

/* s, o of group g (of G lanes) for the 64 rows of tile t (portable; the SIMD forms do the same per lane). */
AB_INLINE void ab_kq_params_portable(const ab_kq *k, size_t t, int g, float *sb, float *ob) {
    ab_kq_ptrs P = ab_kq_at(k, t, g);
    const uint16_t *d = P.d, *dm = P.dm;
    const uint8_t *sc = P.sc, *mm = P.m;
    for (int i = 0; i < 64; i++) {
        float a = ab_h2f(d[i]);
        if (k->flags & AB_KQ_SC) {
            int hi = k->flags & AB_KQ_HI ? (mm[i & 31] >> (i & 32 ? 4 : 0) & 3) << 4 : 0;
            float v = k->flags & AB_KQ_SIGNED ? (float)(int8_t)sc[i] : (float)(k->flags & AB_KQ_NIB ? (sc[i] & 15) | hi : sc[i]);
            a = a * v;
        }
        sb[i] = 0.5f * a;
        float o = k->c0 * a;
        if (k->flags & AB_KQ_DMIN) {
            int hi = k->flags & AB_KQ_HI ? (mm[i & 31] >> (i & 32 ? 4 : 0) >> 2 & 3) << 4 : 0;
            float mv = k->flags & AB_KQ_NIB ? (float)((sc[i] >> 4) | hi) : (k->flags & AB_KQ_M ? (float)mm[i] : 1.0f);
            o = o - ab_h2f(dm[i]) * mv;
        }
        ob[i] = o;
    }
}

AB_INLINE const float *ab_gp_kq_portable(const void *sc, size_t at, float *sb, float *ob, const float **wo) {
    const ab_kq *k = sc;
    size_t tg = at / 64;
    ab_kq_params_portable(k, tg / k->ng, (int)(tg % k->ng), sb, ob);
    *wo = ob;
    return sb;
}

AB_INLINE float ab_h2f(uint16_t h) {
    uint32_t e = h >> 10 & 31, m = h & 1023u, bits;
    float v;
    if (e == 0) {                         /* zero or subnormal: m * 2^-24 is exact in float32 */
        v = (float)m * 0x1p-24f;
        return h & 0x8000 ? -v : v;
    }
    bits = (uint32_t)(h & 0x8000) << 16 | (e == 31 ? 0x7f800000u : (e + 112) << 23) | m << 13;
    memcpy(&v, &bits, 4);
    return v;
}

AB_INLINE const float *ab_gp_portable(const void *sc, const void *off, int f16, size_t at,
                                      float *sb, float *ob, const float **wo) {
    if (f16 & AB_F16_KQ) return ab_gp_kq_portable(sc, at, sb, ob, wo);
    if (!f16) {
        *wo = off ? (const float *)off + at : NULL;
        return (const float *)sc + at;
    }
    const uint16_t *a = (const uint16_t *)sc + at, *z = off ? (const uint16_t *)off + at : NULL;
    float p1 = (float)AB_F16_R(f16), zk = -(float)AB_F16_ZK(f16);
    for (int i = 0; i < 64; i++) {
        float s = 0.5f * ab_h2f(a[i]);
        sb[i] = s;
        if (z) ob[i] = ab_h2f(z[i]) + p1 * s;
        else if (zk != 0.0f) ob[i] = zk * ab_h2f(a[i]) + p1 * s;
    }
    *wo = (z || zk != 0.0f) ? ob : NULL;
    return sb;
}

AB_AVX2 static inline const float *ab_gp_kq_avx2(const void *sc, size_t at, float *sb, float *ob,
                                                 const float **wo) {
    const ab_kq *k = sc;
    size_t tg = at / 64;
    ab_kq_ptrs P = ab_kq_at(k, tg / k->ng, (int)(tg % k->ng));
    const uint16_t *d = P.d, *dm = P.dm;
    const uint8_t *scp = P.sc, *mm = P.m;
    const __m256 half = _mm256_set1_ps(0.5f), c0 = _mm256_set1_ps(k->c0);
    const __m256i lo4 = _mm256_set1_epi32(15);
    for (int i = 0; i < 64; i += 8) {
        __m256 a = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(d + i)));
        __m128i s8 = _mm_loadl_epi64((const __m128i *)(scp + i));
        __m256i su = _mm256_cvtepu8_epi32(s8), hs = _mm256_setzero_si256(), hm = hs;
        if (k->flags & AB_KQ_HI) {          /* high bits of sc and m: see AB_KQ_HI */
            __m256i h = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)(mm + (i & 31))));
            h = _mm256_and_si256(i & 32 ? _mm256_srli_epi32(h, 4) : h, lo4);
            hs = _mm256_slli_epi32(_mm256_and_si256(h, _mm256_set1_epi32(3)), 4);
            hm = _mm256_slli_epi32(_mm256_srli_epi32(h, 2), 4);
        }
        if (k->flags & AB_KQ_SC) {
            __m256i sv = k->flags & AB_KQ_SIGNED ? _mm256_cvtepi8_epi32(s8)
                                                 : (k->flags & AB_KQ_NIB ? _mm256_or_si256(_mm256_and_si256(su, lo4), hs) : su);
            a = _mm256_mul_ps(a, _mm256_cvtepi32_ps(sv));
        }
        _mm256_storeu_ps(sb + i, _mm256_mul_ps(half, a));
        __m256 o = _mm256_mul_ps(c0, a);
        if (k->flags & AB_KQ_DMIN) {
            __m256 mv = k->flags & AB_KQ_NIB ? _mm256_cvtepi32_ps(_mm256_or_si256(_mm256_srli_epi32(su, 4), hm))
                        : (k->flags & AB_KQ_M ? _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)(mm + i))))
                                              : _mm256_set1_ps(1.0f));
            o = _mm256_sub_ps(o, _mm256_mul_ps(_mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(dm + i))), mv));
        }
        _mm256_storeu_ps(ob + i, o);
    }
    *wo = ob;
    return sb;
}

AB_AVX2 static inline const float *ab_gp_avx2(const void *sc, const void *off, int f16, size_t at,
                                              float *sb, float *ob, const float **wo) {
    if (f16 & AB_F16_KQ) return ab_gp_kq_avx2(sc, at, sb, ob, wo);
    if (!f16) {
        *wo = off ? (const float *)off + at : NULL;
        return (const float *)sc + at;
    }
    const uint16_t *a = (const uint16_t *)sc + at, *z = off ? (const uint16_t *)off + at : NULL;
    const __m256 half = _mm256_set1_ps(0.5f), p1 = _mm256_set1_ps((float)AB_F16_R(f16));
    const float zk1 = -(float)AB_F16_ZK(f16);
    const __m256 zk = _mm256_set1_ps(zk1);
    for (int i = 0; i < 64; i += 8) {
        __m256 av = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(a + i)));
        __m256 s = _mm256_mul_ps(half, av);
        _mm256_storeu_ps(sb + i, s);
        if (z) _mm256_storeu_ps(ob + i, _mm256_add_ps(_mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(z + i))),
                                                      _mm256_mul_ps(p1, s)));
        else if (zk1 != 0.0f) _mm256_storeu_ps(ob + i, _mm256_add_ps(_mm256_mul_ps(zk, av), _mm256_mul_ps(p1, s)));
    }
    *wo = (z || zk1 != 0.0f) ? ob : NULL;
    return sb;
}

/* The sub-scales and mins of 64 rows as bytes (sc, signed where AB_KQ_SIGNED; m), unpacked for all rows at
 * once: one 512-bit op per step instead of one per 16 rows in 32-bit lanes. */
AB_AVX512 static inline void ab_kq_bytes_avx512(const ab_kq *k, ab_kq_ptrs P, uint8_t *sbytes, uint8_t *mbytes) {
    const __m512i n4 = _mm512_set1_epi8(15);
    __m512i sv8 = _mm512_loadu_si512((const void *)P.sc), mv8 = _mm512_setzero_si512();
    if (k->flags & AB_KQ_NIB) {
        __m512i hh = _mm512_setzero_si512();
        if (k->flags & AB_KQ_HI) {          /* high bits of sc and m: see AB_KQ_HI */
            __m256i h = _mm256_loadu_si256((const __m256i *)P.m);
            hh = _mm512_and_si512(_mm512_inserti64x4(_mm512_castsi256_si512(h), _mm256_srli_epi16(h, 4), 1), n4);
        }
        mv8 = _mm512_or_si512(_mm512_and_si512(_mm512_srli_epi16(sv8, 4), n4),
                              _mm512_slli_epi16(_mm512_and_si512(hh, _mm512_set1_epi8(12)), 2));
        sv8 = _mm512_or_si512(_mm512_and_si512(sv8, n4), _mm512_slli_epi16(_mm512_and_si512(hh, _mm512_set1_epi8(3)), 4));
    } else if (k->flags & AB_KQ_M)
        mv8 = _mm512_loadu_si512((const void *)P.m);
    _mm512_store_si512((void *)sbytes, sv8);
    _mm512_store_si512((void *)mbytes, mv8);
}

/* Rows i..i+15 of those bytes as floats. */
AB_AVX512 static inline __m512 ab_kq_scf_avx512(const ab_kq *k, const uint8_t *sbytes, int i) {
    __m128i s8 = _mm_load_si128((const __m128i *)(sbytes + i));
    return _mm512_cvtepi32_ps(k->flags & AB_KQ_SIGNED ? _mm512_cvtepi8_epi32(s8) : _mm512_cvtepu8_epi32(s8));
}

AB_AVX512 static inline __m512 ab_kq_mf_avx512(const ab_kq *k, const uint8_t *mbytes, int i) {
    return k->flags & (AB_KQ_NIB | AB_KQ_M)
               ? _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_load_si128((const __m128i *)(mbytes + i))))
               : _mm512_set1_ps(1.0f);
}

/* The same floats as ab_kq_params_portable. */
AB_AVX512 static inline const float *ab_gp_kq_avx512(const void *sc, size_t at, float *sb, float *ob,
                                                     const float **wo) {
    const ab_kq *k = sc;
    size_t tg = at / 64;
    ab_kq_ptrs P = ab_kq_at(k, tg / k->ng, (int)(tg % k->ng));
    const __m512 half = _mm512_set1_ps(0.5f), c0 = _mm512_set1_ps(k->c0);
    uint8_t sbytes[64] __attribute__((aligned(64))), mbytes[64] __attribute__((aligned(64)));
    ab_kq_bytes_avx512(k, P, sbytes, mbytes);
    for (int i = 0; i < 64; i += 16) {
        __m512 a = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(P.d + i)));
        if (k->flags & AB_KQ_SC) a = _mm512_mul_ps(a, ab_kq_scf_avx512(k, sbytes, i));
        _mm512_storeu_ps(sb + i, _mm512_mul_ps(half, a));
        __m512 o = _mm512_mul_ps(c0, a);
        if (k->flags & AB_KQ_DMIN)
            o = _mm512_sub_ps(o, _mm512_mul_ps(_mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(P.dm + i))),
                                               ab_kq_mf_avx512(k, mbytes, i)));
        _mm512_storeu_ps(ob + i, o);
    }
    *wo = ob;
    return sb;
}

AB_AVX512 static inline const float *ab_gp_avx512(const void *sc, const void *off, int f16, size_t at,
                                                  float *sb, float *ob, const float **wo) {
    if (f16 & AB_F16_KQ) return ab_gp_kq_avx512(sc, at, sb, ob, wo);
    if (!f16) {
        *wo = off ? (const float *)off + at : NULL;
        return (const float *)sc + at;
    }
    const uint16_t *a = (const uint16_t *)sc + at, *z = off ? (const uint16_t *)off + at : NULL;
    const __m512 half = _mm512_set1_ps(0.5f), p1 = _mm512_set1_ps((float)AB_F16_R(f16));
    const float zk1 = -(float)AB_F16_ZK(f16);
    const __m512 zk = _mm512_set1_ps(zk1);
    for (int i = 0; i < 64; i += 16) {
        __m512 av = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(a + i)));
        __m512 s = _mm512_mul_ps(half, av);
        _mm512_storeu_ps(sb + i, s);
        if (z) _mm512_storeu_ps(ob + i, _mm512_add_ps(_mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(z + i))),
                                                      _mm512_mul_ps(p1, s)));
        else if (zk1 != 0.0f) _mm512_storeu_ps(ob + i, _mm512_add_ps(_mm512_mul_ps(zk, av), _mm512_mul_ps(p1, s)));
    }
    *wo = (z || zk1 != 0.0f) ? ob : NULL;
    return sb;
}
/* Vector exponentials (kernels_attn.c softmax, kernels_ops.c SwiGLU): Cody-Waite reduction and a
 * degree-6 polynomial. */
/* The exponential's polynomial on [-ln2/2, ln2/2] (Cephes expf coefficients), one body for both widths. */
#define EXP_POLY(fma, set1, r)                                                                         \
    fma(fma(fma(fma(fma(set1(1.9875691500e-4f), r, set1(1.3981999507e-3f)), r, set1(8.3334519073e-3f)), \
                r, set1(4.1665795894e-2f)), r, set1(1.6666665459e-1f)), r, set1(5.0000001201e-1f))

/* exp(x), about 2 ulp: x below -87 gives ~0 (clamped there), above 88.7 gives inf (scalef). */
AB_AVX512 static inline __m512 exp512(__m512 x) {
    x = _mm512_max_ps(x, _mm512_set1_ps(-87.0f));
    __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                    _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
    r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
    __m512 p = EXP_POLY(_mm512_fmadd_ps, _mm512_set1_ps, r);
    p = _mm512_fmadd_ps(p, _mm512_mul_ps(r, r), _mm512_add_ps(r, _mm512_set1_ps(1.0f)));
    return _mm512_scalef_ps(p, n);
}

/* exp(x) clamped to [-87, 88]: 2^n is built in the exponent field, which must stay normal. */
AB_AVX2 static inline __m256 exp256(__m256 x) {
    x = _mm256_min_ps(_mm256_max_ps(x, _mm256_set1_ps(-87.0f)), _mm256_set1_ps(88.0f));
    __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                               _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
    r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
    __m256 p = EXP_POLY(_mm256_fmadd_ps, _mm256_set1_ps, r);
    p = _mm256_fmadd_ps(p, _mm256_mul_ps(r, r), _mm256_add_ps(r, _mm256_set1_ps(1.0f)));
    /* 2^n by the exponent field: n >= -126 here, so the result stays normal */
    __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    return _mm256_mul_ps(p, _mm256_castsi256_ps(e));
}

/* Write one 64-row output tile of token m (the last tile of a row may be partial). */
AB_INLINE void ab_store_tile(float *y, int N, int t, int m, const float *yacc) {
    int n0 = t * 64, nn = N - n0 < 64 ? N - n0 : 64;
    memcpy(y + (size_t)m * N + n0, yacc, (size_t)nn * sizeof(float));
}

/* One run of query rows on one KV cache, for ab_attention_runs (kernels_attn.c): rows q (M, H, hd),
 * positions qpos, cache rows k, v ([T][Hkv][hd], n_ctx of them valid), output out (M, H, hd). */
typedef struct {
    const float *q, *k, *v;
    const int32_t *qpos;
    float *out;
    int M, n_ctx;
} ab_attn_run;
int ab_attention_runs(ab_pool *pool, int isa, const ab_attn_run *runs, int n, int H, int Hkv, int hd, float scale,
                      int window, float softcap);

#endif
