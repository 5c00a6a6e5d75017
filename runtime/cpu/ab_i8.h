/* The context of the byte-code A16 product (kernels_int8.c), shared with its two-level tile loops
 * (kernels_kq.c). Not seen by cffi. */
#ifndef AB_I8_H
#define AB_I8_H
#include "ab_internal.h"

#define XQ 32639.0f

typedef struct {
    const uint8_t *codes;
    const void *wsc, *woff;      /* [Nt][ng][64] float32, or float16 a = 2s and z when f16 (ab_internal.h) */
    const float *x;
    int f16, p, cw, N, Kp, G, L, ng, nb, M, K, Nt, mbmax, isa, nr;
    int qsl;               /* with xi: slices of groups each 8 rows are quantized in (one per thread) */
    int ar;                /* abits "q8": 0, or the block of llama.cpp's 8-bit grid (32: Q8_0, 256: Q8_K) */
    int16_t *x16;
    int8_t *xh, *xl;
    int8_t *xi;            /* NULL, or for the batched tile: xh and xl of each 8 rows interleaved, [M/8][Kp/4]
                            * [hi, lo][8 rows][4 lanes] (the 4-byte groups one vpdpbusd broadcasts) */
    float *sx, *gs;
    int32_t *px;           /* (2^p - 1) * sum of x16 per block, wrapped to 32 bits */
    float *y;
    const ab_kq *kq;       /* two-level parameters and split codes (ab_internal.h), or NULL */
} i8_ctx;

/* Row m's 4-byte groups in xi: group k4 (lanes 4*k4 ..) at + 64 * k4, high bytes there, low bytes 32 on. */
AB_INLINE int8_t *ab_xi_row(const i8_ctx *c, int m) {
    return c->xi + (size_t)(m / 8) * c->Kp * 16 + (m % 8) * 4;
}

/* Shared float epilogue of one block for 64 rows (the portable form; SIMD paths do the same per lane). */
AB_INLINE void i8_finish(const i8_ctx *c, int m, int b, const float *ws, const float *wo, const int32_t *D,
                         float *yacc) {
    int g = b * c->L / c->G;
    float l = c->sx[(size_t)m * c->nb + b];
    for (int i = 0; i < 64; i++) yacc[i] += (float)D[i] * (ws[i] * l);
    if (wo && ((b + 1) * c->L) % c->G == 0) {
        float s = c->gs[(size_t)m * c->ng + g];
        for (int i = 0; i < 64; i++) yacc[i] += wo[i] * s;
    }
}

/* Decode of two-level weights with the parameters in registers (kernels_decode.c i8_tile_m1_avx512,
 * kernels_kq.c kq_tile_avx512_m1): d and dmin of a super-block's 64 rows as floats, once per super-block. */
AB_AVX512 AB_INLINE void i8_kq_d_avx512(const ab_kq *k, ab_kq_ptrs P, __m512 *dv, __m512 *dmv) {
    for (int i = 0; i < 4; i++) {
        dv[i] = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(P.d + 16 * i)));
        if (k->flags & AB_KQ_DMIN) dmv[i] = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(P.dm + 16 * i)));
    }
}

/* One block's epilogue for token m: the floats of ab_gp_kq_avx512 (s = 0.5 a, o = c0 a - dmin m, a = d sc)
 * and of ab_i8_tile_rows_avx512 in kernels_batch.c (y += D * (s * sx), then y += o * group sum), the same
 * operations in the same order, so the bits of every other path. */
AB_AVX512 AB_INLINE void i8_kq_epi_avx512(const i8_ctx *c, const ab_kq *k, int m, int b, const __m512 *dv,
                                          const __m512 *dmv, const uint8_t *sbytes, const uint8_t *mbytes,
                                          const __m512i *ah, const __m512i *al, __m512 *ya) {
    const __m512 half = _mm512_set1_ps(0.5f), c0 = _mm512_set1_ps(k->c0);
    __m512i pv = _mm512_set1_epi32(c->px[(size_t)m * c->nb + b]);
    __m512 l = _mm512_set1_ps(c->sx[(size_t)m * c->nb + b]);
    __m512 gsv = _mm512_set1_ps(c->gs[(size_t)m * c->ng + b]);
    for (int i = 0; i < 4; i++) {
        __m512 a = dv[i];
        if (k->flags & AB_KQ_SC) a = _mm512_mul_ps(a, ab_kq_scf_avx512(k, sbytes, 16 * i));
        __m512 s = _mm512_mul_ps(half, a), o = _mm512_mul_ps(c0, a);
        if (k->flags & AB_KQ_DMIN) o = _mm512_sub_ps(o, _mm512_mul_ps(dmv[i], ab_kq_mf_avx512(k, mbytes, 16 * i)));
        __m512i I = _mm512_add_epi32(_mm512_slli_epi32(ah[i], 8), al[i]);
        __m512i D = _mm512_sub_epi32(_mm512_slli_epi32(I, 1), pv);
        ya[i] = _mm512_add_ps(ya[i], _mm512_mul_ps(_mm512_cvtepi32_ps(D), _mm512_mul_ps(s, l)));
        ya[i] = _mm512_add_ps(ya[i], _mm512_mul_ps(o, gsv));
    }
}
/* abits "q8": one row rounded to llama.cpp's 8-bit grid into x16, xh, xl, sx, px, gs (kernels_q8.c). */
void ab_q8_quantize_row(const i8_ctx *c, int m);

/* The decode tile (M = 1) of one-part codes on AVX-512 (kernels_decode.c). */
void ab_i8_tile_m1_avx512(const i8_ctx *c, int t, int m);
/* Up to 8 tokens (rows m0 .. m0+mc-1) of one tile, AVX-512 (kernels_batch.c). */
void ab_i8_tile_rows_avx512(const i8_ctx *c, int t, int m0, int mc);

/* Tiles of two-level weights whose codes come in several parts (kernels_kq.c). */
void ab_kq_tile_portable(const i8_ctx *c, int t, int m0, int mc);
void ab_kq_tile_avx2(const i8_ctx *c, int t, int m0, int mc);
void ab_kq_tile_avx512(const i8_ctx *c, int t, int m0, int mc);

#endif
