/* The decode tile (one token, AVX-512) of the byte-code A16 product (kernels_int8.c): one-part codes, plain
 * or two-level parameters, with the parameters and the output kept in registers (docs/DESIGN.md "CPU
 * kernels"). */
#include <immintrin.h>
#include <string.h>
#include "ab_i8.h"

/* The float epilogue of one block for token m with plain group parameters (float32 s, o, or float16 a = 2s
 * and z): the floats of ab_gp_avx512 and ab_i8_tile_rows_avx512 (kernels_batch.c), the same operations in
 * the same order. */
AB_AVX512 AB_INLINE void i8_plain_epi_avx512(const i8_ctx *c, int t, int m, int b, const __m512i *ah,
                                             const __m512i *al, __m512 *ya) {
    int g = b * c->L / c->G, f16 = c->f16;
    size_t at = ((size_t)t * c->ng + g) * 64;
    const uint16_t *a16 = (const uint16_t *)c->wsc + at, *z16 = c->woff ? (const uint16_t *)c->woff + at : NULL;
    const float zk1 = -(float)AB_F16_ZK(f16);
    int has_o = f16 ? (z16 || zk1 != 0.0f) : c->woff != NULL;
    int gend = has_o && ((b + 1) * c->L) % c->G == 0;
    const __m512 half = _mm512_set1_ps(0.5f), p1 = _mm512_set1_ps((float)AB_F16_R(f16)), zk = _mm512_set1_ps(zk1);
    __m512i pv = _mm512_set1_epi32(c->px[(size_t)m * c->nb + b]);
    __m512 l = _mm512_set1_ps(c->sx[(size_t)m * c->nb + b]);
    __m512 gsv = _mm512_set1_ps(gend ? c->gs[(size_t)m * c->ng + g] : 0.0f);
    for (int i = 0; i < 4; i++) {
        __m512 s, o = _mm512_setzero_ps();
        if (f16) {
            __m512 av = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(a16 + 16 * i)));
            s = _mm512_mul_ps(half, av);
            if (gend) o = z16 ? _mm512_add_ps(_mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(z16 + 16 * i))), _mm512_mul_ps(p1, s))
                              : _mm512_add_ps(_mm512_mul_ps(zk, av), _mm512_mul_ps(p1, s));
        } else {
            s = _mm512_loadu_ps((const float *)c->wsc + at + 16 * i);
            if (gend) o = _mm512_loadu_ps((const float *)c->woff + at + 16 * i);
        }
        __m512i I = _mm512_add_epi32(_mm512_slli_epi32(ah[i], 8), al[i]);
        __m512i D = _mm512_sub_epi32(_mm512_slli_epi32(I, 1), pv);
        ya[i] = _mm512_add_ps(ya[i], _mm512_mul_ps(_mm512_cvtepi32_ps(D), _mm512_mul_ps(s, l)));
        if (gend) ya[i] = _mm512_add_ps(ya[i], _mm512_mul_ps(o, gsv));
    }
}

/* Decode (one token) of one-part codes: the floats of ab_gp_avx512 / ab_gp_kq_avx512 and
 * ab_i8_tile_rows_avx512 (kernels_batch.c) with the same operations in the same order (so the bits of
 * every other path), but kept in registers: no parameter arrays stored and read back per block, the
 * output accumulated in registers over the whole row,
 * two-level d and dmin converted once per super-block. For Q4_K the parameter work had been ~40% of the
 * instructions, so decode was bound by it rather than by memory. */
AB_AVX512 AB_INLINE void i8_tile_m1_avx512(const i8_ctx *c, int t, int m, const int PER) {
    const int cw = 8 / PER;
    const __m512i mask = _mm512_set1_epi8((char)((1 << cw) - 1));
    const ab_kq *k = c->f16 & AB_F16_KQ ? c->wsc : NULL;
    int qpb = c->L / (4 * PER), bps = k ? k->S / c->G : 1;
    const int8_t *qh = c->xh + (size_t)m * c->Kp, *ql = c->xl + (size_t)m * c->Kp;
    __m512 ya[4], dv[4], dmv[4];
    for (int i = 0; i < 4; i++) ya[i] = dv[i] = dmv[i] = _mm512_setzero_ps();
    uint8_t sbytes[64] __attribute__((aligned(64))), mbytes[64] __attribute__((aligned(64)));
    for (int b = 0; b < c->nb; b++) {
        const uint8_t *w = c->codes + ((size_t)t * (c->Kp / (4 * PER)) + (size_t)b * qpb) * 256;
        /* the codes 2 KB ahead: measured +4..12% from memory on 2 cores (-8% from cache), the hardware
         * prefetchers alone leaving the stream short of the memory roof (prefetching past the end is harmless) */
        for (int q = 0; q < qpb * 4; q++) _mm_prefetch((const char *)(w + 2048 + 64 * q), _MM_HINT_T0);
        __m512i ah[4], al[4];
        for (int i = 0; i < 4; i++) ah[i] = al[i] = _mm512_setzero_si512();
        for (int j = 0; j < qpb; j++) {
            __m512i wv[4];
            for (int i = 0; i < 4; i++) wv[i] = _mm512_loadu_si512((const void *)(w + (size_t)j * 256 + 64 * i));
            for (int u = 0; u < PER; u++) {
                int32_t h4, l4;
                memcpy(&h4, qh + (size_t)b * c->L + 4 * (PER * j + u), 4);
                memcpy(&l4, ql + (size_t)b * c->L + 4 * (PER * j + u), 4);
                __m512i bh = _mm512_set1_epi32(h4), bl = _mm512_set1_epi32(l4);
                for (int i = 0; i < 4; i++) {
                    __m512i cv = PER == 1 ? wv[i] : _mm512_and_si512(u ? _mm512_srli_epi16(wv[i], cw * u) : wv[i], mask);
                    ah[i] = _mm512_dpbusd_epi32(ah[i], cv, bh);
                    al[i] = _mm512_dpbusd_epi32(al[i], cv, bl);
                }
            }
        }
        if (k) {
            ab_kq_ptrs P = ab_kq_at(k, (size_t)t, b);
            if (b % bps == 0) i8_kq_d_avx512(k, P, dv, dmv);
            ab_kq_bytes_avx512(k, P, sbytes, mbytes);
            i8_kq_epi_avx512(c, k, m, b, dv, dmv, sbytes, mbytes, ah, al, ya);
        } else
            i8_plain_epi_avx512(c, t, m, b, ah, al, ya);
    }
    float yacc[64] __attribute__((aligned(64)));
    for (int i = 0; i < 4; i++) _mm512_store_ps(yacc + 16 * i, ya[i]);
    ab_store_tile(c->y, c->N, t, m, yacc);
}

AB_AVX512 void ab_i8_tile_m1_avx512(const i8_ctx *c, int t, int m) {
    if (c->cw == 8) i8_tile_m1_avx512(c, t, m, 1);
    else if (c->cw == 4) i8_tile_m1_avx512(c, t, m, 2);
    else i8_tile_m1_avx512(c, t, m, 4);
}
