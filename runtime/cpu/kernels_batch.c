/* The batched tile (up to 8 tokens, AVX-512) of the byte-code A16 product (kernels_int8.c): batched decode
 * (a token of each of up to 8 sequences) and the 8-token slices of a prompt.
 *
 * Loop order: per block, per 16 weight rows (a quarter of the tile), the codes are unpacked once and feed
 * every token's two vpdpbusd (activation high and low bytes), the activation bytes broadcast from memory
 * inside the vpdpbusd. With 8 tokens that is 16 accumulators, so the whole quarter stays in registers and
 * the unpacking is 1 op per 16 multiply-adds. The earlier tile (two tokens per pass over all 64 rows:
 * 16 accumulators, every 4-byte activation broadcast into a register, each pass unpacking the codes again)
 * ran vpdpbusd at about half of its issue rate in an 8-sequence decode step.
 *
 * Per token and block the sums D are the same integers as every other path's, and the float epilogue is
 * the tiles' (y += D * (s * sx), then y += o * group sum at a group end), the same operations
 * in the same order: a token's result does not depend on the tokens beside it, and equals its decode
 * (M = 1) result bit for bit. */
#include <immintrin.h>
#include <string.h>
#include "ab_i8.h"

/* acc += codes . (the 4 activation bytes at p, broadcast): vpdpbusd with its broadcast memory operand, one
 * instruction (GCC keeps a broadcast register per token instead, and runs out of registers at 8 tokens). */
AB_AVX512 AB_INLINE __m512i dp_bcast(__m512i acc, __m512i codes, const int8_t *p) {
    __asm__("vpdpbusd %2%{1to16%}, %1, %0" : "+v"(acc) : "v"(codes), "m"(*(const int32_t *)p));
    return acc;
}

AB_AVX512 AB_INLINE void i8_tile_rows_avx512(const i8_ctx *c, int t, int m0, const int R, const int PER) {
    const int cw = 8 / PER;
    /* PER > 1: the codes doubled (2c fits a byte), so that the low sum starts at -px and the high one needs
     * no doubling: D = 2 * (256 H + L) - px = 256 H' + L' with H' = sum 2c xh, L' = -px + sum 2c xl */
    const __m512i mask = _mm512_set1_epi8((char)(((1 << cw) - 1) << (PER > 1)));
    const int qpb = c->L / (4 * PER);
    const size_t Kp = (size_t)c->Kp;
    float yacc[8][64] __attribute__((aligned(64)));
    memset(yacc, 0, sizeof yacc);
    for (int b = 0; b < c->nb; b++) {
        const uint8_t *w = c->codes + ((size_t)t * (Kp / (4 * PER)) + (size_t)b * qpb) * 256;
        for (int q = 0; q < qpb * 4; q++) _mm_prefetch((const char *)(w + 2048 + 64 * q), _MM_HINT_T0);
        int g = b * c->L / c->G;
        float sb[64] __attribute__((aligned(64))), ob[64] __attribute__((aligned(64)));
        const float *wo, *ws = ab_gp_avx512(c->wsc, c->woff, c->f16, ((size_t)t * c->ng + g) * 64, sb, ob, &wo);
        int gend = wo && ((b + 1) * c->L) % c->G == 0;
        const int8_t *xb = ab_xi_row(c, m0) + (size_t)b * c->L * 16;     /* m0: a multiple of 8 */
        for (int i = 0; i < 4; i++) {
            __m512i ah[8], al[8];
            for (int r = 0; r < R; r++) {
                ah[r] = _mm512_setzero_si512();
                al[r] = PER > 1 ? _mm512_set1_epi32((int32_t)(0u - (uint32_t)c->px[(size_t)(m0 + r) * c->nb + b])) : ah[r];
            }
            for (int j = 0; j < qpb; j++) {
                __m512i wv = _mm512_loadu_si512((const void *)(w + (size_t)j * 256 + 64 * i));
                for (int u = 0; u < PER; u++) {
                    __m512i cv = PER == 1 ? wv : _mm512_and_si512(u ? _mm512_srli_epi16(wv, cw * u - 1) : _mm512_add_epi8(wv, wv), mask);
                    const int8_t *x4 = xb + 64 * (PER * j + u);
                    for (int r = 0; r < R; r++) {
                        ah[r] = dp_bcast(ah[r], cv, x4 + 4 * r);
                        al[r] = dp_bcast(al[r], cv, x4 + 32 + 4 * r);
                    }
                }
            }
            __m512 wsv = _mm512_loadu_ps(ws + 16 * i), wov = gend ? _mm512_loadu_ps(wo + 16 * i) : wsv;
            for (int r = 0; r < R; r++) {
                size_t mb = (size_t)(m0 + r) * c->nb + b;
                __m512i D = _mm512_add_epi32(_mm512_slli_epi32(ah[r], 8), al[r]);
                if (PER == 1) D = _mm512_sub_epi32(_mm512_slli_epi32(D, 1), _mm512_set1_epi32(c->px[mb]));
                __m512 sc = _mm512_mul_ps(wsv, _mm512_set1_ps(c->sx[mb]));
                __m512 ya = _mm512_add_ps(_mm512_load_ps(&yacc[r][16 * i]), _mm512_mul_ps(_mm512_cvtepi32_ps(D), sc));
                if (gend) ya = _mm512_add_ps(ya, _mm512_mul_ps(wov, _mm512_set1_ps(c->gs[(size_t)(m0 + r) * c->ng + g])));
                _mm512_store_ps(&yacc[r][16 * i], ya);
            }
        }
    }
    for (int r = 0; r < R; r++) ab_store_tile(c->y, c->N, t, m0 + r, yacc[r]);
}

#define AB_ROWS_CASE(R)                                                   \
    case R:                                                               \
        if (c->cw == 8) i8_tile_rows_avx512(c, t, m0, R, 1);             \
        else if (c->cw == 4) i8_tile_rows_avx512(c, t, m0, R, 2);        \
        else i8_tile_rows_avx512(c, t, m0, R, 4);                        \
        return;

AB_AVX512 void ab_i8_tile_rows_avx512(const i8_ctx *c, int t, int m0, int mc) {
    switch (mc) {
        AB_ROWS_CASE(1) AB_ROWS_CASE(2) AB_ROWS_CASE(3) AB_ROWS_CASE(4) AB_ROWS_CASE(5) AB_ROWS_CASE(6) AB_ROWS_CASE(7)
        AB_ROWS_CASE(8)
    }
}
