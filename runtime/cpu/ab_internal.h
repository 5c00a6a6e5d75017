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
int ab_i8_run(ab_pool *pool, int isa, const uint8_t *codes, const void *wsc, const void *woff, int f16,
              int p, int cw, int N, int Kp, int G, const float *x, int M, int K, float *y, void *scratch);

size_t ab_qd_scratch(int M, int Kp);
int ab_qd_run(ab_pool *pool, int isa, const uint8_t *codes, const int32_t *wpw, const void *wsc, const void *woff,
              int f16, int p, int cw, int N, int Kp, int G, int q, int Ga, int L, const float *x, const float *smooth,
              int M, int K, float *y, float *ascales, int64_t *dbg_I, int64_t *dbg_U, void *scratch);

/* RoPE split in two (kernels_ops.c): the table once per step, then applied per rope op. */
void ab_rope_table(const int32_t *pos, int M, int n_rot, float theta, const float *freqs, double *cs, double *sn);
void ab_rope_apply(ab_pool *pool, float *x, int M, int H, int hd, int style, const double *cs, const double *sn);

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

AB_AVX2 static inline const float *ab_gp_avx2(const void *sc, const void *off, int f16, size_t at,
                                              float *sb, float *ob, const float **wo) {
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

AB_AVX512 static inline const float *ab_gp_avx512(const void *sc, const void *off, int f16, size_t at,
                                                  float *sb, float *ob, const float **wo) {
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

#endif
