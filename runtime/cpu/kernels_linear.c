/* Bit-plane linear kernels of the CPU backend (docs/DESIGN.md "Products").
 *
 * A16 (float activations), T-MAC style: for every 4 input lanes a 16-entry table holds the bipolar sums
 * +-x0 +-x1 +-x2 +-x3 (entry n has sign + on lane j where bit j of n is set; entry 15-n is the negation of
 * entry n), quantized to 16 bits with one scale per block of L lanes (ab_a16_block) and stored as two
 * byte tables (signed high byte, unsigned low byte). A weight plane byte (8 lanes of one row) selects two
 * entries with its two nibbles; byte shuffles do 64 rows at once. Lookups are summed exactly in int16
 * (high and low bytes apart) over runs of planes combined MSB first by doubling (a16_run_planes), folded
 * into int32 as 256*high + low, then the block is scaled (table scale * weight scale) in float. Every ISA
 * path builds the same integer tables (the AVX-512 builder keeps the scalar sum order), so all paths
 * compute identical integers.
 *
 * Quantized activations: AND + popcount over the canonical planes, with code sums (= weighted row
 * popcounts) precomputed, giving the exact integers I[b], U[b] of DESIGN.md; recovery in double.
 */
#include <immintrin.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>
#include "ab_internal.h"

int ab_isa_available(void) {
    __builtin_cpu_init();
    int r = 0;
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("popcnt") &&
        __builtin_cpu_supports("f16c"))
        r |= 1 << AB_ISA_AVX2;
    if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
        __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512vpopcntdq") &&
        __builtin_cpu_supports("avx512vbmi") && __builtin_cpu_supports("avx512vnni") &&
        __builtin_cpu_supports("popcnt"))
        r |= 1 << AB_ISA_AVX512;
    return r | 1;  /* bit 0: portable */
}

static int isa_ok(int isa) {
    return isa >= 0 && isa <= AB_ISA_AVX512 && (ab_isa_available() >> isa & 1);
}

/* Table block: the largest divisor of G that is a multiple of 8 lanes and at most 256 lanes, so a block
 * never crosses a weight group and the int16 per-plane sums cannot overflow (low bytes: L/8 * 510 <=
 * 16320, high bytes: L/8 * 256 <= 8192). */
int ab_a16_block(int G) {
    if (G <= 256) return G;
    for (int L = 256; L >= 8; L -= 8)
        if (G % L == 0) return L;
    return 8;
}

static void *xalloc(size_t n) {
    void *p = NULL;
    if (posix_memalign(&p, 64, n ? n : 64)) return NULL;
    return p;
}

/* One activation row -> 16-bit tables split into bytes, table scales lscale[Kp/L], group sums gsum[Kp/G].
 * Entries are q = round(T / s) with s = block max / 32767 (int8 tables lost 0.4% perplexity on the
 * default model; 16 bits make the table error ~256x smaller). q = 256*hi + lo with hi = q >> 8 (signed
 * byte) and lo = q & 255 (unsigned byte), so two byte shuffles fetch q exactly. Layout per 8 lanes (one
 * weight byte), AB_LUT_BYTES = 64 bytes: [hi, lanes 0-3][hi, lanes 4-7][lo, lanes 0-3][lo, lanes 4-7]. */
int ab_build_lut(const float *x, int K, int Kp, int G, int8_t *lut, float *lscale, float *gsum) {
    int L = ab_a16_block(G);
    float T[64 * 16];
    for (int b = 0; b < Kp / L; b++) {
        float mx = 0.0f;
        for (int j = 0; j < L / 4; j++) {
            int k = b * L + 4 * j;
            float xv[4];
            for (int i = 0; i < 4; i++) xv[i] = (k + i < K) ? x[k + i] : 0.0f;
            float *t = T + 16 * j;
            for (int n = 0; n < 16; n++) {
                float a = ((n & 1) ? xv[0] : -xv[0]) + ((n & 2) ? xv[1] : -xv[1]);
                float c = ((n & 4) ? xv[2] : -xv[2]) + ((n & 8) ? xv[3] : -xv[3]);
                t[n] = a + c;
                float ab = fabsf(t[n]);
                if (ab > mx) mx = ab;
            }
        }
        float inv = mx > 0.0f ? 32767.0f / mx : 0.0f;
        lscale[b] = mx / 32767.0f;
        int8_t *o = lut + (size_t)b * L * 8;
        for (int j = 0; j < L / 4; j++) {
            int8_t *oc = o + (size_t)(j >> 1) * 64 + (j & 1) * 16;
            for (int n = 0; n < 16; n++) {
                float r = rintf(T[16 * j + n] * inv);
                r = r > 32767.0f ? 32767.0f : (r < -32767.0f ? -32767.0f : r);
                int q = (int)r;
                oc[n] = (int8_t)(q >> 8);
                oc[32 + n] = (int8_t)(uint8_t)(q & 255);
            }
        }
    }
    if (gsum) {
        for (int g = 0; g < Kp / G; g++) {
            double s = 0.0;
            for (int k = g * G; k < (g + 1) * G && k < K; k++) s += x[k];
            gsum[g] = (float)s;
        }
    }
    return 0;
}

/* The same tables with AVX-512: one 16-float vector per 4 lanes. Products by +-1 are exact and the sum
 * order is that of ab_build_lut ((+-x0 +-x1) + (+-x2 +-x3)), so the integers are identical. */
AB_AVX512 static void build_lut_avx512(const float *x, int K, int Kp, int G, int8_t *lut, float *lscale,
                                       float *gsum) {
    int L = ab_a16_block(G);
    const __m512 S0 = _mm512_setr_ps(-1, 1, -1, 1, -1, 1, -1, 1, -1, 1, -1, 1, -1, 1, -1, 1);
    const __m512 S1 = _mm512_setr_ps(-1, -1, 1, 1, -1, -1, 1, 1, -1, -1, 1, 1, -1, -1, 1, 1);
    const __m512 S2 = _mm512_setr_ps(-1, -1, -1, -1, 1, 1, 1, 1, -1, -1, -1, -1, 1, 1, 1, 1);
    const __m512 S3 = _mm512_setr_ps(-1, -1, -1, -1, -1, -1, -1, -1, 1, 1, 1, 1, 1, 1, 1, 1);
    const __m512i lim = _mm512_set1_epi32(32767), nlim = _mm512_set1_epi32(-32767);
    __m512 T[64];
    for (int b = 0; b < Kp / L; b++) {
        __m512 mx = _mm512_setzero_ps();
        for (int j = 0; j < L / 4; j++) {
            int k = b * L + 4 * j;
            float xv[4];
            for (int i = 0; i < 4; i++) xv[i] = (k + i < K) ? x[k + i] : 0.0f;
            __m512 a = _mm512_add_ps(_mm512_mul_ps(_mm512_set1_ps(xv[0]), S0), _mm512_mul_ps(_mm512_set1_ps(xv[1]), S1));
            __m512 c = _mm512_add_ps(_mm512_mul_ps(_mm512_set1_ps(xv[2]), S2), _mm512_mul_ps(_mm512_set1_ps(xv[3]), S3));
            T[j] = _mm512_add_ps(a, c);
            mx = _mm512_max_ps(mx, _mm512_abs_ps(T[j]));
        }
        float m = _mm512_reduce_max_ps(mx);
        float inv = m > 0.0f ? 32767.0f / m : 0.0f;
        lscale[b] = m / 32767.0f;
        __m512 vinv = _mm512_set1_ps(inv);
        int8_t *o = lut + (size_t)b * L * 8;
        for (int j = 0; j < L / 4; j++) {
            int8_t *oc = o + (size_t)(j >> 1) * 64 + (j & 1) * 16;
            __m512i q = _mm512_cvtps_epi32(_mm512_mul_ps(T[j], vinv));    /* round to nearest even = rintf */
            q = _mm512_max_epi32(_mm512_min_epi32(q, lim), nlim);
            _mm_storeu_si128((__m128i *)oc, _mm512_cvtepi32_epi8(_mm512_srai_epi32(q, 8)));
            _mm_storeu_si128((__m128i *)(oc + 32), _mm512_cvtepi32_epi8(q));
        }
    }
    if (gsum) {
        for (int g = 0; g < Kp / G; g++) {
            double sm = 0.0;
            for (int k = g * G; k < (g + 1) * G && k < K; k++) sm += x[k];
            gsum[g] = (float)sm;
        }
    }
}

/* ---------------------------------------------------------------- A16 table-lookup GEMV / GEMM --- */

#define AB_LUT_BYTES 64     /* table bytes per 8 lanes */

typedef struct {
    const uint8_t *wl;
    const float *wsc, *woff, *x;
    int p, N, Kp, G, L, C, ng, nb, M, K, Nt, nmb, mbmax;
    int8_t *lut;
    float *ls, *gs, *y;
} a16_ctx;

AB_INLINE void a16_finish_block(const a16_ctx *c, int t, int m0, int mc, int b, int32_t (*acc32)[64],
                                float (*yacc)[64]) {
    int g = b * c->L / c->G;
    const float *ws = c->wsc + ((size_t)t * c->ng + g) * 64;
    for (int m = 0; m < mc; m++) {
        float l = c->ls[(size_t)(m0 + m) * c->nb + b];
        for (int i = 0; i < 64; i++) yacc[m][i] += (float)acc32[m][i] * (l * ws[i]);
    }
    if (c->woff && ((b + 1) * c->L) % c->G == 0) {
        const float *wo = c->woff + ((size_t)t * c->ng + g) * 64;
        for (int m = 0; m < mc; m++) {
            float s = c->gs[(size_t)(m0 + m) * c->ng + g];
            for (int i = 0; i < 64; i++) yacc[m][i] += wo[i] * s;
        }
    }
}

/* Planes that can be combined (doubling) in the int16 accumulators before folding into int32: the
 * low-byte sum of one plane and block is at most L/8 * 510, so a run of R planes stays below
 * (2^R - 1) * L/8 * 510 <= 32767 (L = 32: 4 planes, so W4 never leaves int16 inside a block). */
static inline int a16_run_planes(int L) {
    int R = 1;
    while (R < 8 && ((1 << (R + 1)) - 1) * (L / 8) * 510 <= 32767) R++;
    return R;
}

AB_INLINE void a16_store(const a16_ctx *c, int t, int m0, int mc, float (*yacc)[64]) {
    int n0 = t * 64, nn = c->N - n0 < 64 ? c->N - n0 : 64;
    for (int m = 0; m < mc; m++) memcpy(c->y + (size_t)(m0 + m) * c->N + n0, yacc[m], nn * sizeof(float));
}

static void a16_tile_portable(const a16_ctx *c, int t, int m0, int mc) {
    float yacc[4][64] = {{0}};
    int32_t acc32[4][64], acc16[4][64];
    int cb = c->L / 8;
    for (int b = 0; b < c->nb; b++) {
        memset(acc32, 0, sizeof acc32);
        for (int r = 0; r < c->p; r++) {
            memset(acc16, 0, sizeof acc16);
            const uint8_t *w = c->wl + ((size_t)(t * c->p + r) * c->C + (size_t)b * cb) * 64;
            for (int cc = 0; cc < cb; cc++) {
                for (int m = 0; m < mc; m++) {
                    const int8_t *t0 = c->lut + (size_t)(m0 + m) * c->C * AB_LUT_BYTES +
                                       ((size_t)b * cb + cc) * AB_LUT_BYTES;
                    for (int pos = 0; pos < 64; pos++) {
                        int row = ((pos >> 3) & 1) * 32 + (pos >> 4) * 8 + (pos & 7);
                        uint8_t byte = w[cc * 64 + pos];
                        int e0 = byte & 15, e1 = byte >> 4;
                        acc16[m][row] += 256 * (t0[e0] + t0[16 + e1]) +
                                         (uint8_t)t0[32 + e0] + (uint8_t)t0[48 + e1];
                    }
                }
            }
            for (int m = 0; m < mc; m++)
                for (int i = 0; i < 64; i++) acc32[m][i] = 2 * acc32[m][i] + acc16[m][i];
        }
        a16_finish_block(c, t, m0, mc, b, acc32, yacc);
    }
    a16_store(c, t, m0, mc, yacc);
}

/* Per plane and block: high-byte sums (signed, via maddubs(ones, hi)) and low-byte sums (unsigned, via
 * maddubs(lo, ones)) in int16, folded into the int32 plane accumulator as 2*acc + 256*hi + lo. */
AB_AVX2 AB_INLINE void a16_tile_avx2_mb(const a16_ctx *c, int t, int m0, const int MB) {
    float yacc[4][64] __attribute__((aligned(64))) = {{0}};
    int32_t acc32[4][64] __attribute__((aligned(64)));
    const __m256i lomask = _mm256_set1_epi8(0x0f), ones = _mm256_set1_epi8(1);
    int cb = c->L / 8, run = a16_run_planes(c->L);
    for (int b = 0; b < c->nb; b++) {
        memset(acc32, 0, sizeof acc32);
        for (int r0 = 0; r0 < c->p; r0 += run) {
          int R = c->p - r0 < run ? c->p - r0 : run;
          __m256i ah[2][4], al[2][4];
          for (int m = 0; m < MB; m++)
              for (int i = 0; i < 4; i++) ah[m][i] = al[m][i] = _mm256_setzero_si256();
          for (int r = r0; r < r0 + R; r++) {
            if (r > r0)
                for (int m = 0; m < MB; m++)
                    for (int i = 0; i < 4; i++) {
                        ah[m][i] = _mm256_slli_epi16(ah[m][i], 1);
                        al[m][i] = _mm256_slli_epi16(al[m][i], 1);
                    }
            const uint8_t *w = c->wl + ((size_t)(t * c->p + r) * c->C + (size_t)b * cb) * 64;
            const int8_t *lt = c->lut + (size_t)m0 * c->C * AB_LUT_BYTES + (size_t)b * cb * AB_LUT_BYTES;
            for (int cc = 0; cc < cb; cc++) {
                for (int hh = 0; hh < 2; hh++) {
                    __m256i wv = _mm256_loadu_si256((const __m256i *)(w + cc * 64 + 32 * hh));
                    __m256i lo = _mm256_and_si256(wv, lomask);
                    __m256i hi = _mm256_and_si256(_mm256_srli_epi16(wv, 4), lomask);
                    for (int m = 0; m < MB; m++) {
                        const int8_t *tp = lt + ((size_t)m * c->C + cc) * AB_LUT_BYTES;
                        __m256i h0 = _mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i *)tp));
                        __m256i h1 = _mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i *)(tp + 16)));
                        __m256i l0 = _mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i *)(tp + 32)));
                        __m256i l1 = _mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i *)(tp + 48)));
                        __m256i rh0 = _mm256_shuffle_epi8(h0, lo), rh1 = _mm256_shuffle_epi8(h1, hi);
                        __m256i rl0 = _mm256_shuffle_epi8(l0, lo), rl1 = _mm256_shuffle_epi8(l1, hi);
                        ah[m][hh] = _mm256_add_epi16(ah[m][hh], _mm256_maddubs_epi16(ones, _mm256_unpacklo_epi8(rh0, rh1)));
                        ah[m][2 + hh] = _mm256_add_epi16(ah[m][2 + hh], _mm256_maddubs_epi16(ones, _mm256_unpackhi_epi8(rh0, rh1)));
                        al[m][hh] = _mm256_add_epi16(al[m][hh], _mm256_maddubs_epi16(_mm256_unpacklo_epi8(rl0, rl1), ones));
                        al[m][2 + hh] = _mm256_add_epi16(al[m][2 + hh], _mm256_maddubs_epi16(_mm256_unpackhi_epi8(rl0, rl1), ones));
                    }
                }
            }
          }
          /* ah/al[m][i] hold rows 16i .. 16i+15 in order; fold the run into int32 */
          for (int m = 0; m < MB; m++)
              for (int i = 0; i < 4; i++) {
                  __m256i *d = (__m256i *)&acc32[m][16 * i];
                  __m256i hl = _mm256_cvtepi16_epi32(_mm256_castsi256_si128(ah[m][i]));
                  __m256i hh2 = _mm256_cvtepi16_epi32(_mm256_extracti128_si256(ah[m][i], 1));
                  __m256i ll = _mm256_cvtepi16_epi32(_mm256_castsi256_si128(al[m][i]));
                  __m256i lh = _mm256_cvtepi16_epi32(_mm256_extracti128_si256(al[m][i], 1));
                  d[0] = _mm256_add_epi32(_mm256_add_epi32(_mm256_slli_epi32(d[0], R), _mm256_slli_epi32(hl, 8)), ll);
                  d[1] = _mm256_add_epi32(_mm256_add_epi32(_mm256_slli_epi32(d[1], R), _mm256_slli_epi32(hh2, 8)), lh);
              }
        }
        a16_finish_block(c, t, m0, MB, b, acc32, yacc);
    }
    a16_store(c, t, m0, MB, yacc);
}

AB_AVX2 static void a16_tile_avx2(const a16_ctx *c, int t, int m0, int mc) {
    switch (mc) {
    case 1: a16_tile_avx2_mb(c, t, m0, 1); break;
    default: a16_tile_avx2_mb(c, t, m0, 2); break;
    }
}

AB_AVX512 AB_INLINE void a16_tile_avx512_mb(const a16_ctx *c, int t, int m0, const int MB) {
    float yacc[4][64] __attribute__((aligned(64))) = {{0}};
    int32_t acc32[4][64] __attribute__((aligned(64)));
    const __m512i lomask = _mm512_set1_epi8(0x0f), ones = _mm512_set1_epi8(1);
    int cb = c->L / 8, run = a16_run_planes(c->L);
    for (int b = 0; b < c->nb; b++) {
        memset(acc32, 0, sizeof acc32);
        for (int r0 = 0; r0 < c->p; r0 += run) {
          int R = c->p - r0 < run ? c->p - r0 : run;
          __m512i ah[4][2], al[4][2];
          for (int m = 0; m < MB; m++) ah[m][0] = ah[m][1] = al[m][0] = al[m][1] = _mm512_setzero_si512();
          for (int r = r0; r < r0 + R; r++) {
            if (r > r0)
                for (int m = 0; m < MB; m++)
                    for (int h = 0; h < 2; h++) {
                        ah[m][h] = _mm512_slli_epi16(ah[m][h], 1);
                        al[m][h] = _mm512_slli_epi16(al[m][h], 1);
                    }
            const uint8_t *w = c->wl + ((size_t)(t * c->p + r) * c->C + (size_t)b * cb) * 64;
            const int8_t *lt = c->lut + (size_t)m0 * c->C * AB_LUT_BYTES + (size_t)b * cb * AB_LUT_BYTES;
            for (int cc = 0; cc < cb; cc++) {
                __m512i wv = _mm512_loadu_si512((const void *)(w + cc * 64));
                __m512i lo = _mm512_and_si512(wv, lomask);
                __m512i hi = _mm512_and_si512(_mm512_srli_epi16(wv, 4), lomask);
                for (int m = 0; m < MB; m++) {
                    const int8_t *tp = lt + ((size_t)m * c->C + cc) * AB_LUT_BYTES;
                    __m512i h0 = _mm512_broadcast_i32x4(_mm_loadu_si128((const __m128i *)tp));
                    __m512i h1 = _mm512_broadcast_i32x4(_mm_loadu_si128((const __m128i *)(tp + 16)));
                    __m512i l0 = _mm512_broadcast_i32x4(_mm_loadu_si128((const __m128i *)(tp + 32)));
                    __m512i l1 = _mm512_broadcast_i32x4(_mm_loadu_si128((const __m128i *)(tp + 48)));
                    __m512i rh0 = _mm512_shuffle_epi8(h0, lo), rh1 = _mm512_shuffle_epi8(h1, hi);
                    __m512i rl0 = _mm512_shuffle_epi8(l0, lo), rl1 = _mm512_shuffle_epi8(l1, hi);
                    ah[m][0] = _mm512_add_epi16(ah[m][0], _mm512_maddubs_epi16(ones, _mm512_unpacklo_epi8(rh0, rh1)));
                    ah[m][1] = _mm512_add_epi16(ah[m][1], _mm512_maddubs_epi16(ones, _mm512_unpackhi_epi8(rh0, rh1)));
                    al[m][0] = _mm512_add_epi16(al[m][0], _mm512_maddubs_epi16(_mm512_unpacklo_epi8(rl0, rl1), ones));
                    al[m][1] = _mm512_add_epi16(al[m][1], _mm512_maddubs_epi16(_mm512_unpackhi_epi8(rl0, rl1), ones));
                }
            }
          }
          /* ah/al[m][h] hold rows 32h .. 32h+31 in order; fold the run into int32 */
          for (int m = 0; m < MB; m++)
              for (int h = 0; h < 2; h++) {
                  __m512i *d = (__m512i *)&acc32[m][32 * h];
                  __m512i hl = _mm512_cvtepi16_epi32(_mm512_castsi512_si256(ah[m][h]));
                  __m512i hh2 = _mm512_cvtepi16_epi32(_mm512_extracti64x4_epi64(ah[m][h], 1));
                  __m512i ll = _mm512_cvtepi16_epi32(_mm512_castsi512_si256(al[m][h]));
                  __m512i lh = _mm512_cvtepi16_epi32(_mm512_extracti64x4_epi64(al[m][h], 1));
                  d[0] = _mm512_add_epi32(_mm512_add_epi32(_mm512_slli_epi32(d[0], R), _mm512_slli_epi32(hl, 8)), ll);
                  d[1] = _mm512_add_epi32(_mm512_add_epi32(_mm512_slli_epi32(d[1], R), _mm512_slli_epi32(hh2, 8)), lh);
              }
        }
        a16_finish_block(c, t, m0, MB, b, acc32, yacc);
    }
    a16_store(c, t, m0, MB, yacc);
}

AB_AVX512 static void a16_tile_avx512(const a16_ctx *c, int t, int m0, int mc) {
    switch (mc) {
    case 1: a16_tile_avx512_mb(c, t, m0, 1); break;
    case 2: a16_tile_avx512_mb(c, t, m0, 2); break;
    case 3: a16_tile_avx512_mb(c, t, m0, 3); break;
    default: a16_tile_avx512_mb(c, t, m0, 4); break;
    }
}

typedef struct { a16_ctx c; int isa, nr; } a16_job;

static void a16_task(void *ctx, int task) {
    a16_job *j = ctx;
    const a16_ctx *c = &j->c;
    int r = task % j->nr, mb = task / j->nr;
    int m0 = mb * c->mbmax, mc = c->M - m0 < c->mbmax ? c->M - m0 : c->mbmax;
    int t0, t1;
    ab_range(c->Nt, j->nr, r, &t0, &t1);
    for (int t = t0; t < t1; t++) {   /* contiguous tile ranges: ab_i8_ranges */
        if (j->isa == AB_ISA_AVX512) a16_tile_avx512(c, t, m0, mc);
        else if (j->isa == AB_ISA_AVX2) a16_tile_avx2(c, t, m0, mc);
        else a16_tile_portable(c, t, m0, mc);
    }
}

static void lut_task(void *ctx, int m) {
    a16_job *j = ctx;
    a16_ctx *c = &j->c;
    const float *x = c->x + (size_t)m * c->K;
    int8_t *lut = c->lut + (size_t)m * c->C * AB_LUT_BYTES;
    float *ls = c->ls + (size_t)m * c->nb, *gs = c->gs + (size_t)m * c->ng;
    if (j->isa == AB_ISA_AVX512) build_lut_avx512(x, c->K, c->Kp, c->G, lut, ls, gs);
    else ab_build_lut(x, c->K, c->Kp, c->G, lut, ls, gs);
}

/* Scratch bytes ab_a16_run needs for M rows of Kp lanes (tables, table scales, group sums). */
size_t ab_a16_scratch(int M, int Kp) {
    return (size_t)M * ((size_t)Kp / 8 * AB_LUT_BYTES + (size_t)Kp / 8 * sizeof(float) * 2) + 192;
}

/* The A16 product with caller-provided scratch (ab_a16_scratch bytes, or NULL to allocate). */
int ab_a16_run(ab_pool *pool, int isa, const uint8_t *wl, const float *wsc, const float *woff,
               int p, int N, int Kp, int G, const float *x, int M, int K, float *y, void *scratch) {
    if (p < 1 || p > 8 || G % 32 || Kp % G || K > Kp || M < 0 || N < 0) return -3;
    if (M == 0 || N == 0) return 0;
    a16_job j;
    a16_ctx *c = &j.c;
    j.isa = isa;
    c->wl = wl; c->wsc = wsc; c->woff = woff; c->x = x; c->y = y;
    c->p = p; c->N = N; c->Kp = Kp; c->G = G; c->L = ab_a16_block(G); c->C = Kp / 8;
    c->ng = Kp / G; c->nb = Kp / c->L; c->M = M; c->K = K; c->Nt = (N + 63) / 64;
    c->mbmax = isa == AB_ISA_AVX2 ? 2 : 4;
    c->nmb = (M + c->mbmax - 1) / c->mbmax;
    void *own = NULL;
    if (!scratch) {
        scratch = own = xalloc(ab_a16_scratch(M, Kp));
        if (!own) return -1;
    }
    uintptr_t s = ((uintptr_t)scratch + 63) & ~(uintptr_t)63;
    c->lut = (int8_t *)s;
    c->ls = (float *)(s + (size_t)M * c->C * AB_LUT_BYTES);
    c->gs = c->ls + (size_t)M * c->nb;
    ab_pool_run(pool, lut_task, &j, M);
    j.nr = ab_i8_ranges(pool, c->Nt, c->M);
    ab_pool_run(pool, a16_task, &j, j.nr * c->nmb);
    free(own);
    return 0;
}

int ab_linear_a16(ab_pool *pool, int isa, const uint8_t *wl, const float *wsc, const float *woff,
                  int p, int N, int Kp, int G, const float *x, int M, int K, float *y) {
    if (!isa_ok(isa)) return -2;
    return ab_a16_run(pool, isa, wl, wsc, woff, p, N, Kp, G, x, M, K, y, NULL);
}

/* Exact float32 reference path of A16 (validation): y = sum_g s*sum_r 2^(p-1-r) (S_r . x) + o*sum_g x,
 * straight from the canonical planes, no table quantization. */
typedef struct {
    const uint32_t *planes;
    const float *scales, *offsets, *x;
    int p, N, Kp, G, M, K, W;
    float *y;
} a16f_ctx;

static void a16f_task(void *ctx, int n) {
    a16f_ctx *c = ctx;
    for (int m = 0; m < c->M; m++) {
        const float *x = c->x + (size_t)m * c->K;
        double y = 0.0;
        for (int g = 0; g < c->Kp / c->G; g++) {
            double gsum = 0.0, acc = 0.0;
            for (int k = g * c->G; k < (g + 1) * c->G && k < c->K; k++) gsum += x[k];
            for (int r = 0; r < c->p; r++) {
                const uint32_t *w = c->planes + ((size_t)r * c->N + n) * c->W;
                double pos = 0.0;
                for (int k = g * c->G; k < (g + 1) * c->G && k < c->K; k++)
                    if (w[k >> 5] >> (k & 31) & 1) pos += x[k];
                acc += (double)(1 << (c->p - 1 - r)) * (2.0 * pos - gsum);
            }
            size_t si = (size_t)n * (c->Kp / c->G) + g;
            y += c->scales[si] * acc + (c->offsets ? c->offsets[si] * gsum : 0.0);
        }
        c->y[(size_t)m * c->N + n] = (float)y;
    }
}

int ab_linear_a16_f32(ab_pool *pool, const uint32_t *planes, const float *scales, const float *offsets,
                      int p, int N, int Kp, int G, const float *x, int M, int K, float *y) {
    if (p < 1 || p > 8 || G <= 0 || G % 16 || Kp % G || K > Kp) return -3;    /* 16: two-level sub-blocks */
    a16f_ctx c = {planes, scales, offsets, x, p, N, Kp, G, M, K, Kp / 32, y};
    ab_pool_run(pool, a16f_task, &c, N);
    return 0;
}

/* ------------------------------------------------------------- quantized activations (popcount) --- */

/* Sum of codes per 32-lane word: out[row][w] = sum_r 2^(p-1-r) popc(planes[r][row][w]). */
void ab_code_sums(const uint32_t *planes, int p, int rows, int W, uint16_t *out) {
    for (size_t i = 0; i < (size_t)rows * W; i++) {
        int s = 0;
        for (int r = 0; r < p; r++) s = 2 * s + __builtin_popcount(planes[(size_t)r * rows * W + i]);
        out[i] = (uint16_t)s;
    }
}

typedef struct {
    const float *x, *smooth;
    int M, K, Kp, q, Ga, W, nga;
    uint32_t *aplanes;
    float *ascales;
    uint16_t *acsum;
} qa_ctx;

/* Matches loader.bipolar.quantize_activations bit for bit: the scale and the code rule in double. */
static void qa_task(void *ctx, int m) {
    qa_ctx *c = ctx;
    const float *x = c->x + (size_t)m * c->K;
    int top = (1 << c->q) - 1;
    for (int w = 0; w < c->W; w++) {
        for (int t = 0; t < c->q; t++) c->aplanes[((size_t)t * c->M + m) * c->W + w] = 0;
        c->acsum[(size_t)m * c->W + w] = 0;
    }
    for (int ga = 0; ga < c->nga; ga++) {
        int k0 = ga * c->Ga, k1 = k0 + c->Ga < c->K ? k0 + c->Ga : c->K;
        double mx = 0.0;
        for (int k = k0; k < k1; k++) {
            double v = c->smooth ? (double)x[k] / (double)c->smooth[k] : (double)x[k];
            if (fabs(v) > mx) mx = fabs(v);
        }
        double s = mx / top;
        /* an all-zero group stores scale 0 (exact) but codes it with scale 1, as the reference does */
        c->ascales[(size_t)m * c->nga + ga] = (float)s;
        if (!(s > 0.0)) s = 1.0;
        for (int k = k0; k < k1; k++) {
            double v = c->smooth ? (double)x[k] / (double)c->smooth[k] : (double)x[k];
            double cd = rint((v / s + top) / 2.0);
            int code = cd < 0 ? 0 : (cd > top ? top : (int)cd);
            for (int t = 0; t < c->q; t++)
                if (code >> (c->q - 1 - t) & 1)
                    c->aplanes[((size_t)t * c->M + m) * c->W + (k >> 5)] |= 1u << (k & 31);
            c->acsum[(size_t)m * c->W + (k >> 5)] += (uint16_t)code;
        }
    }
}

int ab_quantize_acts(ab_pool *pool, const float *x, int M, int K, int Kp, int q, int Ga,
                     const float *smooth, uint32_t *aplanes, float *ascales, uint16_t *acsum) {
    if (q < 1 || q > 8 || Ga % 32 || Kp % 32 || K > Kp || Ga <= 0) return -3;
    qa_ctx c = {x, smooth, M, K, Kp, q, Ga, Kp / 32, (Kp + Ga - 1) / Ga, aplanes, ascales, acsum};
    ab_pool_run(pool, qa_task, &c, M);
    return 0;
}

typedef struct {
    const uint32_t *planes, *aplanes;
    const uint16_t *wcsum, *acsum;
    const float *scales, *offsets, *ascales;
    int p, q, N, W, G, Ga, L, M, K, ng, nga, nb, isa, rows_per_task;
    const int32_t *PA;     /* (M, nb) activation code sums per block */
    float *y;
    int64_t *dbg_I, *dbg_U;
} q_ctx;

/* X per word: sum_r sum_t 2^(p-1-r) 2^(q-1-t) popc(W_r & A_t). Generic (popcnt instruction under the
 * avx2 target attribute, bit tricks in the portable build). */
AB_INLINE void xword_scalar(const q_ctx *c, int n, int m, int32_t *X) {
    size_t ws = (size_t)c->N * c->W, as = (size_t)c->M * c->W;
    const uint32_t *wp = c->planes + (size_t)n * c->W, *ap = c->aplanes + (size_t)m * c->W;
    for (int k = 0; k < c->W; k++) {
        int32_t s = 0;
        for (int r = 0; r < c->p; r++) {
            uint32_t wr = wp[r * ws + k];
            int32_t inner = 0;
            for (int t = 0; t < c->q; t++) inner = 2 * inner + __builtin_popcount(wr & ap[t * as + k]);
            s = 2 * s + inner;
        }
        X[k] = s;
    }
}

AB_AVX512 static void xword_avx512(const q_ctx *c, int n, int m, int32_t *X) {
    size_t ws = (size_t)c->N * c->W, as = (size_t)c->M * c->W;
    const uint32_t *wp = c->planes + (size_t)n * c->W, *ap = c->aplanes + (size_t)m * c->W;
    for (int k = 0; k < c->W; k += 16) {
        __mmask16 mk = c->W - k >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << (c->W - k)) - 1);
        __m512i a[8];
        for (int t = 0; t < c->q; t++) a[t] = _mm512_maskz_loadu_epi32(mk, ap + t * as + k);
        __m512i s = _mm512_setzero_si512();
        for (int r = 0; r < c->p; r++) {
            __m512i wr = _mm512_maskz_loadu_epi32(mk, wp + r * ws + k);
            __m512i inner = _mm512_setzero_si512();
            for (int t = 0; t < c->q; t++)
                inner = _mm512_add_epi32(_mm512_slli_epi32(inner, 1),
                                         _mm512_popcnt_epi32(_mm512_and_si512(wr, a[t])));
            s = _mm512_add_epi32(_mm512_slli_epi32(s, 1), inner);
        }
        _mm512_mask_storeu_epi32(X + k, mk, s);
    }
}

AB_AVX2 static void xword_avx2(const q_ctx *c, int n, int m, int32_t *X) { xword_scalar(c, n, m, X); }
static void xword_portable(const q_ctx *c, int n, int m, int32_t *X) { xword_scalar(c, n, m, X); }

static void q_task(void *ctx, int task) {
    q_ctx *c = ctx;
    int32_t *X = malloc((size_t)c->W * sizeof(int32_t));
    int64_t *PW = malloc((size_t)c->nb * sizeof(int64_t));
    if (!X || !PW) { free(X); free(PW); return; }   /* y keeps its poison; caller checks nothing else */
    int Lw = c->L / 32;
    int64_t P1 = (1 << c->p) - 1, Q1 = (1 << c->q) - 1;
    int n1 = (task + 1) * c->rows_per_task < c->N ? (task + 1) * c->rows_per_task : c->N;
    for (int n = task * c->rows_per_task; n < n1; n++) {
        for (int b = 0; b < c->nb; b++) {
            int64_t s = 0;
            for (int k = b * Lw; k < (b + 1) * Lw; k++) s += c->wcsum[(size_t)n * c->W + k];
            PW[b] = s;
        }
        for (int m = 0; m < c->M; m++) {
            if (c->isa == AB_ISA_AVX512) xword_avx512(c, n, m, X);
            else if (c->isa == AB_ISA_AVX2) xword_avx2(c, n, m, X);
            else xword_portable(c, n, m, X);
            double acc = 0.0;
            for (int b = 0; b < c->nb; b++) {
                int64_t Xb = 0;
                for (int k = b * Lw; k < (b + 1) * Lw; k++) Xb += X[k];
                int64_t nv = (int64_t)c->K - (int64_t)b * c->L;
                nv = nv < 0 ? 0 : (nv > c->L ? c->L : nv);
                int64_t PA = c->PA[(size_t)m * c->nb + b];
                int64_t I = 4 * Xb - 2 * Q1 * PW[b] - 2 * P1 * PA + P1 * Q1 * nv;
                int64_t U = 2 * PA - Q1 * nv;
                int g = b * c->L / c->G, ga = b * c->L / c->Ga;
                double sw = c->scales[(size_t)n * c->ng + g];
                double part = sw * (double)I;
                if (c->offsets) part += (double)c->offsets[(size_t)n * c->ng + g] * (double)U;
                acc += (double)c->ascales[(size_t)m * c->nga + ga] * part;
                if (c->dbg_I) {
                    size_t di = ((size_t)m * c->N + n) * c->nb + b;
                    c->dbg_I[di] = I;
                    c->dbg_U[di] = U;
                }
            }
            c->y[(size_t)m * c->N + n] = (float)acc;
        }
    }
    free(X);
    free(PW);
}

int ab_linear_quant(ab_pool *pool, int isa, const uint32_t *planes, const uint16_t *wcsum,
                    const float *scales, const float *offsets, int p, int N, int Kp, int G,
                    const uint32_t *aplanes, const uint16_t *acsum, const float *ascales, int q, int Ga,
                    int L, int M, int K, float *y, int64_t *dbg_I, int64_t *dbg_U) {
    if (!isa_ok(isa)) return -2;
    if (p < 1 || p > 8 || q < 1 || q > 8 || L <= 0 || L % 32 || G % L || Ga % L || Kp % G || Kp % L ||
        K > Kp)
        return -3;
    if (M == 0 || N == 0) return 0;
    q_ctx c;
    c.planes = planes; c.aplanes = aplanes; c.wcsum = wcsum; c.acsum = acsum;
    c.scales = scales; c.offsets = offsets; c.ascales = ascales;
    c.p = p; c.q = q; c.N = N; c.W = Kp / 32; c.G = G; c.Ga = Ga; c.L = L; c.M = M; c.K = K;
    c.ng = Kp / G; c.nga = (Kp + Ga - 1) / Ga; c.nb = Kp / L; c.isa = isa;
    c.rows_per_task = 16;
    c.y = y; c.dbg_I = dbg_I; c.dbg_U = dbg_U;
    int32_t *PA = xalloc((size_t)M * c.nb * sizeof(int32_t));
    if (!PA) return -1;
    int Lw = L / 32;
    for (int m = 0; m < M; m++)
        for (int b = 0; b < c.nb; b++) {
            int32_t s = 0;
            for (int k = b * Lw; k < (b + 1) * Lw; k++) s += acsum[(size_t)m * c.W + k];
            PA[(size_t)m * c.nb + b] = s;
        }
    c.PA = PA;
    ab_pool_run(pool, q_task, &c, (N + c.rows_per_task - 1) / c.rows_per_task);
    free(PA);
    return 0;
}
