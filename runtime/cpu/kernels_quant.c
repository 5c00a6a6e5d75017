/* Quantized activations (abits 1..8) by byte dot products on packed codes (docs/DESIGN.md "Products").
 *
 * Why not AND + popcount: the bit-serial form costs p*q popcounts per 32-lane word and a scalar recovery
 * per (row, token, block); at W8A8 that is 64 AND+popcount per word. vpdpbusd multiplies 64 byte pairs in
 * one instruction, so the code product costs one instruction per 4 lanes x 16 rows whatever p and q are.
 * The integers are the same by the identity v . u = sum of bipolar values:
 *
 *   weights   c_w in [0, 2^p) (layout.codes_tiles, the tiles kernels_int8.c reads), v = 2 c_w - P1
 *   acts      c_a in [0, 2^q), stored centred e = c_a - 2^(q-1) in [-128, 127] (a signed byte at every
 *             q <= 8), u = 2 c_a - Q1 = 2 e + 1; e = 0 in padding lanes (k >= K)
 *   per block b of L lanes, n_b valid lanes, D = sum_k c_w e (pad lanes add 0: c_w = e = 0 there):
 *     U = sum_valid u = 2 sum e + n_b
 *     I = sum_valid v u = 2 sum c_w u - P1 U = 4 D + 2 PW - P1 U,    PW = sum_k c_w (precomputed per word)
 *
 * |I| <= L * 255 * 255, so for L <= 32768 every 32-bit intermediate (wrapping) gives I exactly. Recovery,
 * per row and block, in float32 with the same operations in the same order on every path (the build
 * disables FMA contraction, runtime/cpu/build.py), so all ISAs give bitwise-identical y:
 *     t = s_w * (float)I;  t = t + o * (float)U  (asymmetric);  y = y + s_a * t
 * (float)I is exact for L <= 256 at W8A8 (|I| < 2^24). AVX-512 vectorises over 16 rows (vpdpbusd),
 * AVX2 widens codes to 16 bits (vpmaddwd: vpmaddubsw would saturate at p = 8), portable multiplies in C.
 */
#include <immintrin.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>
#include "ab_internal.h"

typedef struct {
    const uint8_t *codes;      /* [Nt][Kp/(4*per)][64][4] */
    const int32_t *wpw;        /* [Nt][W][64]: 2 * sum of codes of one 32-lane word */
    const void *wsc, *woff;    /* [Nt][ng][64] float32, or float16 a = 2s and z when f16 (ab_internal.h) */
    int f16, p, cw, N, Kp, G, L, ng, nb, M, Nt, mbmax, isa, W, nr;
    int pt;                    /* tile whose parameters wsc/woff start at (0: all tiles; see qd_tile_avx512_per) */
    int wu;                    /* lanes per wpw sum: 32, or 16 for two-level weights with 16-lane groups */
    const int8_t *xe;          /* (M, Kp) centred activation codes */
    const int16_t *xe16;       /* the same widened (AVX2) */
    const int32_t *pu;         /* (M, nb) P1 * U, wrapped */
    const float *fu, *sa;      /* (M, nb) U as float, activation scale of the block */
    float *y;
    int64_t *dbg_I, *dbg_U;
} qd_ctx;

/* ---- activation quantizer: bit for bit loader.bipolar.quantize_activations (double, rint) ---------- */
typedef struct {
    const float *x, *smooth;
    int M, K, Kp, q, Ga, L, nb, nga, P1, want16, isa;
    int8_t *xe;
    int16_t *xe16;
    int32_t *pu;
    float *fu, *sa, *ascales;
} qx_ctx;

/* Codes of lanes [k0, k1) of one group with divisor s (scalar form). */
static void qx_codes_scalar(const float *x, const float *sm, int k0, int k1, double s, int top, int half, int8_t *e) {
    for (int k = k0; k < k1; k++) {
        double v = sm ? (double)x[k] / (double)sm[k] : (double)x[k];
        double cd = rint((v / s + top) / 2.0);
        int code = cd < 0 ? 0 : (cd > top ? top : (int)cd);
        e[k] = (int8_t)(code - half);
    }
}

static double qx_max_scalar(const float *x, const float *sm, int k0, int k1) {
    double mx = 0.0;
    for (int k = k0; k < k1; k++) {
        double v = sm ? (double)x[k] / (double)sm[k] : (double)x[k];
        double a = fabs(v);
        if (a > mx) mx = a;
    }
    return mx;
}

/* AVX-512 forms of the two loops: the same IEEE double operations per lane (division, +, /2, round to
 * nearest even = rint), so the codes are bitwise those of the scalar form. */
AB_AVX512 static double qx_max_avx512(const float *x, const float *sm, int k0, int k1) {
    __m512d mx = _mm512_setzero_pd();
    for (int k = k0; k < k1; k += 8) {
        __mmask8 mk = k1 - k >= 8 ? (__mmask8)0xff : (__mmask8)((1u << (k1 - k)) - 1);
        __m512d v = _mm512_cvtps_pd(_mm256_maskz_loadu_ps(mk, x + k));
        if (sm) v = _mm512_div_pd(v, _mm512_cvtps_pd(_mm256_mask_loadu_ps(_mm256_set1_ps(1.0f), mk, sm + k)));
        mx = _mm512_max_pd(mx, _mm512_abs_pd(v));
    }
    return _mm512_reduce_max_pd(mx);
}

AB_AVX512 static void qx_codes_avx512(const float *x, const float *sm, int k0, int k1, double s, int top, int half,
                                      int8_t *e) {
    __m512d sv = _mm512_set1_pd(s), tv = _mm512_set1_pd((double)top), two = _mm512_set1_pd(2.0);
    __m512d zero = _mm512_setzero_pd();
    __m256i hv = _mm256_set1_epi32(half);
    for (int k = k0; k < k1; k += 8) {
        __mmask8 mk = k1 - k >= 8 ? (__mmask8)0xff : (__mmask8)((1u << (k1 - k)) - 1);
        __m512d v = _mm512_cvtps_pd(_mm256_maskz_loadu_ps(mk, x + k));
        if (sm) v = _mm512_div_pd(v, _mm512_cvtps_pd(_mm256_mask_loadu_ps(_mm256_set1_ps(1.0f), mk, sm + k)));
        __m512d cd = _mm512_div_pd(_mm512_add_pd(_mm512_div_pd(v, sv), tv), two);
        cd = _mm512_roundscale_pd(cd, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
        cd = _mm512_min_pd(_mm512_max_pd(cd, zero), tv);
        __m256i code = _mm256_sub_epi32(_mm512_cvtpd_epi32(cd), hv);   /* cd integral: conversion exact */
        _mm256_mask_cvtepi32_storeu_epi8(e + k, mk, code);
    }
}

static void qx_row(const qx_ctx *c, int m) {
    const float *x = c->x + (size_t)m * c->K;
    int8_t *e = c->xe + (size_t)m * c->Kp;
    int top = (1 << c->q) - 1, half = 1 << (c->q - 1);
    int v512 = c->isa == AB_ISA_AVX512;
    for (int ga = 0; ga < c->nga; ga++) {
        int k0 = ga * c->Ga, k1 = k0 + c->Ga < c->K ? k0 + c->Ga : c->K, kend = k0 + c->Ga < c->Kp ? k0 + c->Ga : c->Kp;
        double mx = k1 <= k0 ? 0.0 : (v512 ? qx_max_avx512(x, c->smooth, k0, k1) : qx_max_scalar(x, c->smooth, k0, k1));
        double s = mx / top;
        if (c->ascales) c->ascales[(size_t)m * c->nga + ga] = (float)s;
        float sf = (float)s;
        if (!(s > 0.0)) s = 1.0;     /* an all-zero group: scale 0 stored, codes made with divisor 1 */
        if (k1 > k0) {
            if (v512) qx_codes_avx512(x, c->smooth, k0, k1, s, top, half, e);
            else qx_codes_scalar(x, c->smooth, k0, k1, s, top, half, e);
        }
        for (int k = k1 > k0 ? k1 : k0; k < kend; k++) e[k] = 0;
        for (int b = k0 / c->L; b < kend / c->L; b++) c->sa[(size_t)m * c->nb + b] = sf;
    }
    for (int b = 0; b < c->nb; b++) {
        int k0 = b * c->L, nv = c->K - k0;
        nv = nv < 0 ? 0 : (nv > c->L ? c->L : nv);
        int32_t s = 0;
        for (int k = k0; k < k0 + c->L; k++) s += e[k];
        int32_t U = 2 * s + nv;
        c->fu[(size_t)m * c->nb + b] = (float)U;
        c->pu[(size_t)m * c->nb + b] = (int32_t)((uint32_t)U * (uint32_t)c->P1);
    }
    if (c->want16)
        for (int k = 0; k < c->Kp; k++) c->xe16[(size_t)m * c->Kp + k] = e[k];
}

static void qx_task(void *ctx, int m) { qx_row(ctx, m); }

/* ---- one block's recovery for 64 rows (portable form; the SIMD paths do exactly this per lane) ------ */
AB_INLINE void qd_finish(const qd_ctx *c, int t, int m, int b, const float *ws, const float *wo, const int32_t *D,
                         float *yacc) {
    int Lw = c->L / c->wu;
    const int32_t *pw = c->wpw + ((size_t)t * (c->Kp / c->wu) + (size_t)b * Lw) * 64;
    size_t mb = (size_t)m * c->nb + b;
    uint32_t pu = (uint32_t)c->pu[mb];
    float fu = c->fu[mb], sa = c->sa[mb];
    for (int i = 0; i < 64; i++) {
        uint32_t pws = 0;
        for (int w = 0; w < Lw; w++) pws += (uint32_t)pw[w * 64 + i];
        int32_t I = (int32_t)(4u * (uint32_t)D[i] + pws - pu);
        float tv = ws[i] * (float)I;
        if (wo) {
            float ov = wo[i] * fu;
            tv = tv + ov;
        }
        float av = sa * tv;
        yacc[i] = yacc[i] + av;
        if (c->dbg_I) {
            int n = t * 64 + i;
            if (n < c->N) {
                c->dbg_I[((size_t)m * c->N + n) * c->nb + b] = I;
                c->dbg_U[((size_t)m * c->N + n) * c->nb + b] = (int64_t)lrintf(fu);
            }
        }
    }
}

static void qd_tile_portable(const qd_ctx *c, int t, int m0, int mc) {
    float yacc[8][64];
    memset(yacc, 0, sizeof yacc);
    int per = 8 / c->cw, qpb = c->L / (4 * per), mask = (1 << c->cw) - 1;
    for (int b = 0; b < c->nb; b++) {
        const uint8_t *w = c->codes + ((size_t)t * (c->Kp / (4 * per)) + (size_t)b * qpb) * 256;
        float sb[64], ob[64];
        const float *wo, *ws = ab_gp_portable(c->wsc, c->woff, c->f16,
                                              ((size_t)t * c->ng + (size_t)b * c->L / c->G) * 64, sb, ob, &wo);
        for (int m = m0; m < m0 + mc; m++) {
            const int8_t *e = c->xe + (size_t)m * c->Kp + (size_t)b * c->L;
            int32_t D[64];
            for (int i = 0; i < 64; i++) {
                int32_t s = 0;
                for (int j = 0; j < qpb; j++)
                    for (int u = 0; u < per; u++)
                        for (int k = 0; k < 4; k++)
                            s += (int32_t)(w[(size_t)j * 256 + 4 * i + k] >> (c->cw * u) & mask) * e[4 * (per * j + u) + k];
                D[i] = s;
            }
            qd_finish(c, t, m, b, ws, wo, D, yacc[m - m0]);
        }
    }
    for (int m = m0; m < m0 + mc; m++) ab_store_tile(c->y, c->N, t, m, yacc[m - m0]);
}

/* ---- AVX2: codes widened to 16 bits, vpmaddwd with 4 activation lanes broadcast ------------------- */
AB_AVX2 static void qd_tile_avx2(const qd_ctx *c, int t, int m0, int mc) {
    float yacc[8][64] __attribute__((aligned(32)));
    memset(yacc, 0, sizeof yacc);
    int per = 8 / c->cw, qpb = c->L / (4 * per), Lw = c->L / c->wu;
    const __m128i mask = _mm_set1_epi8((char)((1 << c->cw) - 1));
    for (int b = 0; b < c->nb; b++) {
        const uint8_t *w = c->codes + ((size_t)t * (c->Kp / (4 * per)) + (size_t)b * qpb) * 256;
        int g = b * c->L / c->G;
        float sb[64] __attribute__((aligned(32))), ob[64] __attribute__((aligned(32)));
        const float *wo, *ws = ab_gp_avx2(c->wsc, c->woff, c->f16, ((size_t)t * c->ng + g) * 64, sb, ob, &wo);
        const int32_t *pw = c->wpw + ((size_t)t * (c->Kp / c->wu) + (size_t)b * Lw) * 64;
        for (int m = m0; m < m0 + mc; m++) {
            const int16_t *q = c->xe16 + (size_t)m * c->Kp + (size_t)b * c->L;
            size_t mb = (size_t)m * c->nb + b;
            __m256i puv = _mm256_set1_epi32(c->pu[mb]);
            __m256 fu = _mm256_set1_ps(c->fu[mb]), sa = _mm256_set1_ps(c->sa[mb]);
            for (int half = 0; half < 2; half++) {
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
                            acc[i] = _mm256_add_epi32(acc[i], _mm256_madd_epi16(_mm256_cvtepu8_epi16(raw), xv));
                        }
                    }
                }
                for (int i = 0; i < 4; i++) {
                    __m256i D = _mm256_permute4x64_epi64(_mm256_hadd_epi32(acc[2 * i], acc[2 * i + 1]), 0xD8);
                    int r = 32 * half + 8 * i;
                    __m256i pws = _mm256_loadu_si256((const __m256i *)(pw + r));
                    for (int ww = 1; ww < Lw; ww++)
                        pws = _mm256_add_epi32(pws, _mm256_loadu_si256((const __m256i *)(pw + ww * 64 + r)));
                    __m256i I = _mm256_sub_epi32(_mm256_add_epi32(_mm256_slli_epi32(D, 2), pws), puv);
                    __m256 tv = _mm256_mul_ps(_mm256_loadu_ps(ws + r), _mm256_cvtepi32_ps(I));
                    if (wo) tv = _mm256_add_ps(tv, _mm256_mul_ps(_mm256_loadu_ps(wo + r), fu));
                    __m256 ya = _mm256_load_ps(&yacc[m - m0][r]);
                    _mm256_store_ps(&yacc[m - m0][r], _mm256_add_ps(ya, _mm256_mul_ps(sa, tv)));
                }
            }
        }
    }
    for (int m = m0; m < m0 + mc; m++) ab_store_tile(c->y, c->N, t, m, yacc[m - m0]);
}

/* ---- AVX-512 VNNI: 64 rows x MB tokens per block, weights loaded once per block for all MB tokens --- */
AB_AVX512 AB_INLINE void qd_tile_avx512_k(const qd_ctx *c, int t, int m0, const int PER, const int MB) {
    float yacc[4][64] __attribute__((aligned(64)));
    memset(yacc, 0, sizeof yacc);
    const int cw = 8 / PER;
    const __m512i mask = _mm512_set1_epi8((char)((1 << cw) - 1));
    int qpb = c->L / (4 * PER), Lw = c->L / c->wu;
    for (int b = 0; b < c->nb; b++) {
        const uint8_t *w = c->codes + ((size_t)t * (c->Kp / (4 * PER)) + (size_t)b * qpb) * 256;
        int g = b * c->L / c->G;
        float sb[64] __attribute__((aligned(64))), ob[64] __attribute__((aligned(64)));
        const float *wo, *ws = ab_gp_avx512(c->wsc, c->woff, c->f16, ((size_t)(t - c->pt) * c->ng + g) * 64, sb, ob, &wo);
        const int32_t *pw = c->wpw + ((size_t)t * (c->Kp / c->wu) + (size_t)b * Lw) * 64;
        __m512i acc[4][4];
        for (int m = 0; m < MB; m++)
            for (int i = 0; i < 4; i++) acc[m][i] = _mm512_setzero_si512();
        for (int j = 0; j < qpb; j++) {
            __m512i wv[4];
            for (int i = 0; i < 4; i++) wv[i] = _mm512_loadu_si512((const void *)(w + (size_t)j * 256 + 64 * i));
            for (int u = 0; u < PER; u++) {
                __m512i cv[4];
                for (int i = 0; i < 4; i++)
                    cv[i] = PER == 1 ? wv[i] : _mm512_and_si512(u ? _mm512_srli_epi16(wv[i], cw * u) : wv[i], mask);
                for (int m = 0; m < MB; m++) {
                    int32_t e4;
                    memcpy(&e4, c->xe + (size_t)(m0 + m) * c->Kp + (size_t)b * c->L + 4 * (PER * j + u), 4);
                    __m512i bv = _mm512_set1_epi32(e4);
                    for (int i = 0; i < 4; i++) acc[m][i] = _mm512_dpbusd_epi32(acc[m][i], cv[i], bv);
                }
            }
        }
        for (int i = 0; i < 4; i++) {
            __m512i pws = _mm512_loadu_si512((const void *)(pw + 16 * i));
            for (int ww = 1; ww < Lw; ww++)
                pws = _mm512_add_epi32(pws, _mm512_loadu_si512((const void *)(pw + ww * 64 + 16 * i)));
            __m512 sw = _mm512_loadu_ps(ws + 16 * i);
            __m512 ov = wo ? _mm512_loadu_ps(wo + 16 * i) : _mm512_setzero_ps();
            for (int m = 0; m < MB; m++) {
                size_t mb = (size_t)(m0 + m) * c->nb + b;
                __m512i I = _mm512_sub_epi32(_mm512_add_epi32(_mm512_slli_epi32(acc[m][i], 2), pws),
                                             _mm512_set1_epi32(c->pu[mb]));
                __m512 tv = _mm512_mul_ps(sw, _mm512_cvtepi32_ps(I));
                if (wo) tv = _mm512_add_ps(tv, _mm512_mul_ps(ov, _mm512_set1_ps(c->fu[mb])));
                __m512 ya = _mm512_load_ps(&yacc[m][16 * i]);
                _mm512_store_ps(&yacc[m][16 * i], _mm512_add_ps(ya, _mm512_mul_ps(_mm512_set1_ps(c->sa[mb]), tv)));
            }
        }
    }
    for (int m = 0; m < MB; m++) ab_store_tile(c->y, c->N, t, m0 + m, yacc[m]);
}

AB_AVX512 AB_INLINE void qd_tile_avx512_per(const qd_ctx *c, int t, int m0, int mc, const int PER) {
    /* float16 parameters with several token chunks: convert this tile's groups once (the same exact
     * conversion), not once per chunk; the chunks then read float32 as on the f32 path */
    qd_ctx cc;
    float buf[2 * 48 * 64] __attribute__((aligned(64)));      /* up to K = 1536 at G = 32, 24 KiB */
    if (c->f16 && mc > 4 && c->ng <= 48) {
        cc = *c;
        const float *wo = NULL;
        for (int g = 0; g < c->ng; g++) {
            float *sb = buf + (size_t)g * 64, *ob = buf + ((size_t)c->ng + g) * 64;
            ab_gp_avx512(c->wsc, c->woff, c->f16, ((size_t)t * c->ng + g) * 64, sb, ob, &wo);
        }
        cc.wsc = buf;
        cc.woff = wo ? buf + (size_t)c->ng * 64 : NULL;    /* stored z, or z derived from a (AB_F16_ZK) */
        cc.f16 = 0;
        cc.pt = t;
        c = &cc;
    }
    while (mc > 0) {
        int mb = mc >= 4 ? 4 : mc;
        switch (mb) {
        case 1: qd_tile_avx512_k(c, t, m0, PER, 1); break;
        case 2: qd_tile_avx512_k(c, t, m0, PER, 2); break;
        case 3: qd_tile_avx512_k(c, t, m0, PER, 3); break;
        default: qd_tile_avx512_k(c, t, m0, PER, 4); break;
        }
        m0 += mb;
        mc -= mb;
    }
}

AB_AVX512 static void qd_tile_avx512(const qd_ctx *c, int t, int m0, int mc) {
    if (c->cw == 8) qd_tile_avx512_per(c, t, m0, mc, 1);
    else if (c->cw == 4) qd_tile_avx512_per(c, t, m0, mc, 2);
    else qd_tile_avx512_per(c, t, m0, mc, 4);
}

static void qd_task(void *ctx, int task) {
    const qd_ctx *c = ctx;
    int r = task % c->nr, mbi = task / c->nr;
    int m0 = mbi * c->mbmax, mc = c->M - m0 < c->mbmax ? c->M - m0 : c->mbmax;
    int t0, t1;
    ab_range(c->Nt, c->nr, r, &t0, &t1);
    for (int t = t0; t < t1; t++) {   /* contiguous tile ranges: ab_i8_ranges */
        if (c->dbg_I || c->isa == AB_ISA_PORTABLE) qd_tile_portable(c, t, m0, mc);
        else if (c->isa == AB_ISA_AVX512) qd_tile_avx512(c, t, m0, mc);
        else qd_tile_avx2(c, t, m0, mc);
    }
}

/* 2 * code sum per 32-lane word, tiled [Nt][W][64] (rows past N zero). */
void ab_qd_word_sums(const uint32_t *planes, int p, int N, int W, int32_t *out) {
    int Nt = (N + 63) / 64;
    for (int t = 0; t < Nt; t++)
        for (int w = 0; w < W; w++)
            for (int i = 0; i < 64; i++) {
                int n = t * 64 + i, s = 0;
                if (n < N)
                    for (int r = 0; r < p; r++) s = 2 * s + __builtin_popcount(planes[((size_t)r * N + n) * W + w]);
                out[((size_t)t * W + w) * 64 + i] = 2 * s;
            }
}

size_t ab_qd_scratch(int M, int Kp) {       /* blocks down to 16 lanes (two-level weights) */
    return (size_t)M * ((size_t)Kp * 3 + (size_t)Kp / 16 * 12 + (size_t)Kp / 16 * 4) + 8 * 64;
}

static inline void *carve(uintptr_t *s, size_t n) {
    uintptr_t p = (*s + 63) & ~(uintptr_t)63;
    *s = p + n;
    return (void *)p;
}

int ab_qd_run(ab_pool *pool, int isa, const uint8_t *codes, const int32_t *wpw, const void *wsc, const void *woff,
              int f16, int p, int cw, int N, int Kp, int G, int q, int Ga, int L, const float *x, const float *smooth,
              int M, int K, float *y, float *ascales, int64_t *dbg_I, int64_t *dbg_U, void *scratch) {
    /* two-level parameters (ab_internal.h): groups of the header's G (16 or 32) inside the G = S passed;
     * the codes are plain cw containers here and wpw sums per G lanes when G = 16 */
    const ab_kq *kq = f16 == AB_F16_KQ ? (const ab_kq *)wsc : NULL;
    if (kq) {
        if (!ab_kq_ok(kq, Kp) || G % kq->G) return -3;
        G = kq->G;
    } else if (f16 < 0 || AB_F16_R(f16) > 255 || AB_F16_ZK(f16) > 256 || (AB_F16_ZK(f16) && !AB_F16_R(f16))) {
        return -3;
    }
    int wu = kq && kq->G == 16 ? 16 : 32;
    if (p < 1 || p > 8 || q < 1 || q > 8 || !(cw == 2 || cw == 4 || cw == 8) || p > cw || L <= 0 || L % wu ||
        L > 32768 || G <= 0 || Ga <= 0 || G % L || Ga % L || Kp % G || K > Kp || M < 0 || N < 0)
        return -3;
    if (M == 0 || N == 0) return 0;
    qd_ctx c;
    memset(&c, 0, sizeof c);
    c.wu = wu;
    c.codes = codes; c.wpw = wpw; c.wsc = wsc; c.woff = woff; c.f16 = f16; c.y = y;
    c.p = p; c.cw = cw; c.N = N; c.Kp = Kp; c.G = G; c.L = L; c.ng = Kp / G; c.nb = Kp / L; c.M = M;
    c.Nt = (N + 63) / 64; c.isa = isa; c.W = Kp / 32; c.mbmax = 8;
    c.dbg_I = dbg_I; c.dbg_U = dbg_U;
    void *own = NULL;
    if (!scratch) {
        if (posix_memalign(&own, 64, ab_qd_scratch(M, Kp))) return -1;
        scratch = own;
    }
    uintptr_t s = (uintptr_t)scratch;
    qx_ctx qx;
    qx.x = x; qx.smooth = smooth; qx.M = M; qx.K = K; qx.Kp = Kp; qx.q = q; qx.Ga = Ga; qx.L = L; qx.nb = c.nb;
    qx.nga = (Kp + Ga - 1) / Ga; qx.P1 = (1 << p) - 1; qx.want16 = isa == AB_ISA_AVX2 && !dbg_I; qx.isa = isa;
    qx.xe = carve(&s, (size_t)M * Kp);
    qx.xe16 = carve(&s, (size_t)M * Kp * 2);
    qx.pu = carve(&s, (size_t)M * c.nb * 4);
    qx.fu = carve(&s, (size_t)M * c.nb * 4);
    qx.sa = carve(&s, (size_t)M * c.nb * 4);
    qx.ascales = ascales;
    c.xe = qx.xe; c.xe16 = qx.xe16; c.pu = qx.pu; c.fu = qx.fu; c.sa = qx.sa;
    if (M == 1) qx_row(&qx, 0);
    else ab_pool_run(pool, qx_task, &qx, M);
    c.nr = ab_i8_ranges(pool, c.Nt, M);
    ab_pool_run(pool, qd_task, &c, c.nr * ((M + c.mbmax - 1) / c.mbmax));
    free(own);
    return 0;
}

int ab_linear_qd(ab_pool *pool, int isa, const uint8_t *codes, const int32_t *wpw, const void *wsc,
                 const void *woff, int f16, int p, int cw, int N, int Kp, int G, int q, int Ga, int L, const float *x,
                 const float *smooth, int M, int K, float *y, int64_t *dbg_I, int64_t *dbg_U) {
    if (isa < 0 || isa > AB_ISA_AVX512 || !(ab_isa_available() >> isa & 1)) return -2;
    return ab_qd_run(pool, isa, codes, wpw, wsc, woff, f16, p, cw, N, Kp, G, q, Ga, L, x, smooth, M, K, y, NULL,
                     dbg_I, dbg_U, NULL);
}
