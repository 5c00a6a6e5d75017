/* Byte-code A16 tiles of two-level weights (docs/DESIGN.md "Two-level group parameters"; ab_internal.h
 * AB_F16_KQ) whose codes are stored in parts of 1, 2 or 4 bits (3 = 2+1, 5 = 4+1, 6 = 4+2, 7 = 4+2+1), so
 * that no 5- or 6-bit code sits in an 8-bit container. The integers and the float epilogue are those of
 * kernels_int8.c (the same D per block, the same operations in the same order on every isa); the blocks
 * are the parameters' groups of 16 or 32 lanes. One-part codes never come here: they are plain tiles.
 */
#include <immintrin.h>
#include <string.h>
#include "ab_i8.h"

/* ---- two-level parameters (f16 = AB_F16_KQ): codes in parts, blocks of the header's G = 16 or 32 lanes.
 * Per block the parts are first assembled into whole codes, one byte per lane in the 8-bit layout
 * (blk[q4][64 rows][4 lanes]: a masked part shifted into place cannot leave its byte, since the parts'
 * bits add up to p <= 8), once per block for all tokens; then the same integer D as above. */
static void kq_assemble_portable(const i8_ctx *c, int t, int b, uint8_t *blk) {
    const ab_kq *k = c->kq;
    const uint8_t *tb = c->codes + (size_t)t * k->qtot * 256;
    int n4 = c->L / 4;
    memset(blk, 0, (size_t)n4 * 256);
    for (int r = 0; r < k->nparts; r++) {
        int cw = k->cw[r], per = 8 / cw, mask = (1 << cw) - 1;
        for (int q = 0; q < n4; q++) {
            int q4 = b * n4 + q, j = q4 / per, u = q4 % per;
            const uint8_t *w = tb + ((size_t)k->qoff[r] + j) * 256;
            for (int i = 0; i < 256; i++) blk[q * 256 + i] |= (uint8_t)(((w[i] >> (cw * u)) & mask) << k->shift[r]);
        }
    }
}

AB_AVX2 static void kq_assemble_avx2(const i8_ctx *c, int t, int b, uint8_t *blk) {
    const ab_kq *k = c->kq;
    const uint8_t *tb = c->codes + (size_t)t * k->qtot * 256;
    int n4 = c->L / 4;
    for (int q = 0; q < n4; q++) {
        __m256i acc[8];
        for (int i = 0; i < 8; i++) acc[i] = _mm256_setzero_si256();
        for (int r = 0; r < k->nparts; r++) {
            int cw = k->cw[r], per = 8 / cw, q4 = b * n4 + q, j = q4 / per, u = q4 % per;
            const __m256i mask = _mm256_set1_epi8((char)((1 << cw) - 1));
            const uint8_t *w = tb + ((size_t)k->qoff[r] + j) * 256;
            for (int i = 0; i < 8; i++) {
                __m256i v = _mm256_and_si256(_mm256_srli_epi16(_mm256_loadu_si256((const __m256i *)(w + 32 * i)), cw * u), mask);
                acc[i] = _mm256_or_si256(acc[i], _mm256_slli_epi16(v, k->shift[r]));
            }
        }
        for (int i = 0; i < 8; i++) _mm256_store_si256((__m256i *)(blk + (size_t)q * 256 + 32 * i), acc[i]);
    }
}

AB_AVX512 static void kq_assemble_avx512(const i8_ctx *c, int t, int b, uint8_t *blk) {
    const ab_kq *k = c->kq;
    const uint8_t *tb = c->codes + (size_t)t * k->qtot * 256;
    int n4 = c->L / 4;
    for (int q = 0; q < n4; q++) {
        __m512i acc[4];
        for (int i = 0; i < 4; i++) acc[i] = _mm512_setzero_si512();
        for (int r = 0; r < k->nparts; r++) {
            int cw = k->cw[r], per = 8 / cw, q4 = b * n4 + q, j = q4 / per, u = q4 % per;
            const __m512i mask = _mm512_set1_epi8((char)((1 << cw) - 1));
            const uint8_t *w = tb + ((size_t)k->qoff[r] + j) * 256;
            for (int i = 0; i < 4; i++) {
                __m512i v = _mm512_and_si512(_mm512_srli_epi16(_mm512_loadu_si512((const void *)(w + 64 * i)), cw * u), mask);
                acc[i] = _mm512_or_si512(acc[i], _mm512_slli_epi16(v, k->shift[r]));
            }
        }
        for (int i = 0; i < 4; i++) _mm512_store_si512((void *)(blk + (size_t)q * 256 + 64 * i), acc[i]);
    }
}

void ab_kq_tile_portable(const i8_ctx *c, int t, int m0, int mc) {
    float yacc[8][64];
    uint8_t blk[8 * 256] __attribute__((aligned(64)));
    memset(yacc, 0, sizeof yacc);
    int n4 = c->L / 4;
    for (int b = 0; b < c->nb; b++) {
        kq_assemble_portable(c, t, b, blk);
        float sb[64], ob[64];
        const float *wo, *ws = ab_gp_portable(c->kq, NULL, AB_F16_KQ, ((size_t)t * c->ng + b) * 64, sb, ob, &wo);
        for (int m = m0; m < m0 + mc; m++) {
            const int16_t *q = c->x16 + (size_t)m * c->Kp + (size_t)b * c->L;
            int32_t D[64];
            for (int i = 0; i < 64; i++) {
                int64_t s = 0;
                for (int j = 0; j < n4; j++)
                    for (int e = 0; e < 4; e++) s += (int64_t)blk[j * 256 + 4 * i + e] * q[4 * j + e];
                D[i] = (int32_t)(uint32_t)(2 * (uint64_t)s - (uint32_t)c->px[(size_t)m * c->nb + b]);
            }
            i8_finish(c, m, b, ws, wo, D, yacc[m - m0]);
        }
    }
    for (int m = m0; m < m0 + mc; m++) ab_store_tile(c->y, c->N, t, m, yacc[m - m0]);
}

AB_AVX2 void ab_kq_tile_avx2(const i8_ctx *c, int t, int m0, int mc) {
    float yacc[8][64] __attribute__((aligned(32)));
    uint8_t blk[8 * 256] __attribute__((aligned(64)));
    memset(yacc, 0, sizeof yacc);
    int n4 = c->L / 4;
    for (int b = 0; b < c->nb; b++) {
        kq_assemble_avx2(c, t, b, blk);
        float sb[64] __attribute__((aligned(32))), ob[64] __attribute__((aligned(32)));
        const float *wo, *ws = ab_gp_avx2(c->kq, NULL, AB_F16_KQ, ((size_t)t * c->ng + b) * 64, sb, ob, &wo);
        for (int m = m0; m < m0 + mc; m++) {
            const int16_t *q = c->x16 + (size_t)m * c->Kp + (size_t)b * c->L;
            __m256i pv = _mm256_set1_epi32(c->px[(size_t)m * c->nb + b]);
            __m256 l = _mm256_set1_ps(c->sx[(size_t)m * c->nb + b]);
            __m256 gsv = _mm256_set1_ps(c->gs[(size_t)m * c->ng + b]);
            for (int half = 0; half < 2; half++) {
                __m256i acc[8];
                for (int i = 0; i < 8; i++) acc[i] = _mm256_setzero_si256();
                for (int j = 0; j < n4; j++) {
                    int64_t xp;
                    memcpy(&xp, q + 4 * j, 8);
                    __m256i xv = _mm256_set1_epi64x(xp);
                    const uint8_t *wj = blk + (size_t)j * 256 + 128 * half;
                    for (int i = 0; i < 8; i++)
                        acc[i] = _mm256_add_epi32(acc[i], _mm256_madd_epi16(
                            _mm256_cvtepu8_epi16(_mm_load_si128((const __m128i *)(wj + 16 * i))), xv));
                }
                for (int i = 0; i < 4; i++) {
                    __m256i I = _mm256_permute4x64_epi64(_mm256_hadd_epi32(acc[2 * i], acc[2 * i + 1]), 0xD8);
                    __m256i D = _mm256_sub_epi32(_mm256_slli_epi32(I, 1), pv);
                    int r = 32 * half + 8 * i;
                    __m256 ya = _mm256_load_ps(&yacc[m - m0][r]);
                    ya = _mm256_add_ps(ya, _mm256_mul_ps(_mm256_cvtepi32_ps(D), _mm256_mul_ps(_mm256_loadu_ps(ws + r), l)));
                    ya = _mm256_add_ps(ya, _mm256_mul_ps(_mm256_loadu_ps(wo + r), gsv));
                    _mm256_store_ps(&yacc[m - m0][r], ya);
                }
            }
        }
    }
    for (int m = m0; m < m0 + mc; m++) ab_store_tile(c->y, c->N, t, m, yacc[m - m0]);
}

/* One token (decode): the parts are combined in registers right before the dot products, never stored, and
 * the parameters and the output stay in registers too (i8_kq_epi_avx512). */
AB_AVX512 static void kq_tile_avx512_m1(const i8_ctx *c, int t, int m) {
    const ab_kq *k = c->kq;
    float yacc[64] __attribute__((aligned(64)));
    const uint8_t *tb = c->codes + (size_t)t * k->qtot * 256;
    int n4 = c->L / 4, np = k->nparts;
    __m512i mask[3];
    int per[3];
    for (int r = 0; r < np; r++) {
        per[r] = 8 / k->cw[r];
        mask[r] = _mm512_set1_epi8((char)((1 << k->cw[r]) - 1));
    }
    int bps = k->S / c->G;
    __m512 ya[4], dv[4], dmv[4];
    for (int i = 0; i < 4; i++) ya[i] = dv[i] = dmv[i] = _mm512_setzero_ps();
    uint8_t sbytes[64] __attribute__((aligned(64))), mbytes[64] __attribute__((aligned(64)));
    for (int b = 0; b < c->nb; b++) {
        ab_kq_ptrs P = ab_kq_at(k, (size_t)t, b);
        if (b % bps == 0) i8_kq_d_avx512(k, P, dv, dmv);
        ab_kq_bytes_avx512(k, P, sbytes, mbytes);
        const int8_t *qh = c->xh + (size_t)m * c->Kp + (size_t)b * c->L;
        const int8_t *ql = c->xl + (size_t)m * c->Kp + (size_t)b * c->L;
        __m512i ah[4], al[4];
        for (int i = 0; i < 4; i++) ah[i] = al[i] = _mm512_setzero_si512();
        for (int q = 0; q < n4; q++) {
            int q4 = b * n4 + q;
            __m512i cv[4] = {_mm512_setzero_si512(), _mm512_setzero_si512(), _mm512_setzero_si512(), _mm512_setzero_si512()};
            for (int r = 0; r < np; r++) {
                int j = q4 / per[r], u = q4 % per[r];
                const uint8_t *w = tb + ((size_t)k->qoff[r] + j) * 256;
                for (int i = 0; i < 4; i++) {
                    __m512i v = _mm512_and_si512(_mm512_srli_epi16(_mm512_loadu_si512((const void *)(w + 64 * i)),
                                                                   k->cw[r] * u), mask[r]);
                    if (r) cv[i] = _mm512_or_si512(cv[i], _mm512_slli_epi16(v, k->shift[r]));
                    else cv[i] = v;
                }
            }
            int32_t h4, l4;
            memcpy(&h4, qh + 4 * q, 4);
            memcpy(&l4, ql + 4 * q, 4);
            __m512i bh = _mm512_set1_epi32(h4), bl = _mm512_set1_epi32(l4);
            for (int i = 0; i < 4; i++) {
                ah[i] = _mm512_dpbusd_epi32(ah[i], cv[i], bh);
                al[i] = _mm512_dpbusd_epi32(al[i], cv[i], bl);
            }
        }
        i8_kq_epi_avx512(c, k, m, b, dv, dmv, sbytes, mbytes, ah, al, ya);
    }
    for (int i = 0; i < 4; i++) _mm512_store_ps(yacc + 16 * i, ya[i]);
    ab_store_tile(c->y, c->N, t, m, yacc);
}

AB_AVX512 void ab_kq_tile_avx512(const i8_ctx *c, int t, int m0, int mc) {
    if (mc == 1) {
        kq_tile_avx512_m1(c, t, m0);
        return;
    }
    float yacc[8][64] __attribute__((aligned(64)));
    uint8_t blk[8 * 256] __attribute__((aligned(64)));
    memset(yacc, 0, sizeof yacc);
    int n4 = c->L / 4;
    for (int b = 0; b < c->nb; b++) {
        kq_assemble_avx512(c, t, b, blk);
        float sb[64] __attribute__((aligned(64))), ob[64] __attribute__((aligned(64)));
        const float *wo, *ws = ab_gp_avx512(c->kq, NULL, AB_F16_KQ, ((size_t)t * c->ng + b) * 64, sb, ob, &wo);
        for (int m = m0; m < m0 + mc; m++) {
            const int8_t *qh = c->xh + (size_t)m * c->Kp + (size_t)b * c->L;
            const int8_t *ql = c->xl + (size_t)m * c->Kp + (size_t)b * c->L;
            __m512i ah[4], al[4];
            for (int i = 0; i < 4; i++) ah[i] = al[i] = _mm512_setzero_si512();
            for (int j = 0; j < n4; j++) {
                int32_t h4, l4;
                memcpy(&h4, qh + 4 * j, 4);
                memcpy(&l4, ql + 4 * j, 4);
                __m512i bh = _mm512_set1_epi32(h4), bl = _mm512_set1_epi32(l4);
                for (int i = 0; i < 4; i++) {
                    __m512i cv = _mm512_load_si512((const void *)(blk + (size_t)j * 256 + 64 * i));
                    ah[i] = _mm512_dpbusd_epi32(ah[i], cv, bh);
                    al[i] = _mm512_dpbusd_epi32(al[i], cv, bl);
                }
            }
            __m512i pv = _mm512_set1_epi32(c->px[(size_t)m * c->nb + b]);
            __m512 l = _mm512_set1_ps(c->sx[(size_t)m * c->nb + b]);
            __m512 gsv = _mm512_set1_ps(c->gs[(size_t)m * c->ng + b]);
            for (int i = 0; i < 4; i++) {
                __m512i I = _mm512_add_epi32(_mm512_slli_epi32(ah[i], 8), al[i]);
                __m512i D = _mm512_sub_epi32(_mm512_slli_epi32(I, 1), pv);
                __m512 ya = _mm512_load_ps(&yacc[m - m0][16 * i]);
                ya = _mm512_add_ps(ya, _mm512_mul_ps(_mm512_cvtepi32_ps(D), _mm512_mul_ps(_mm512_loadu_ps(ws + 16 * i), l)));
                ya = _mm512_add_ps(ya, _mm512_mul_ps(_mm512_loadu_ps(wo + 16 * i), gsv));
                _mm512_store_ps(&yacc[m - m0][16 * i], ya);
            }
        }
    }
    for (int m = m0; m < m0 + mc; m++) ab_store_tile(c->y, c->N, t, m, yacc[m - m0]);
}

