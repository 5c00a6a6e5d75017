/* abits "q8" (runtime/act_q8.py): a linear's input rounded to llama.cpp's 8-bit activation grid, then
 * the exact byte-code A16 product of kernels_int8.c.
 *
 * llama.cpp's CPU dot products quantize each linear's input per block, by the rule its weight type pairs
 * with: Q8_0 (32 lanes: d = float16(amax / 127), q = round-half-even(x * (127 / amax))) or Q8_K (256
 * lanes: iscale = -127 / (the first element of largest |x|), q = min(127, round-half-even(iscale * x)),
 * d = 1 / iscale). The rounded row d * q then goes through the A16 kernel exactly: the codes q are its
 * 16-bit activations x16 and d their block scale (the kernel's blocks of L lanes divide the grid block:
 * ab_i8_block), the group sums are sums of d * q, and the block integers D are exactly llama.cpp's.
 * Why not round to floats and let the A16 quantizer re-quantize them: a 256-lane Q8_K block re-quantized
 * per 16- or 32-lane table block (whose own max is not 127 d) is off by up to half a 16-bit step, and on
 * an 8-bit grid such a difference decides roundings downstream (measured on a random Q6_K model: KL 3e-4
 * against llama.cpp instead of 2e-13). Q8_K's d < 0 is stored as (-d, -q), the same products. Only q and
 * d are isa-specific; both paths compute the same floats by the same elementwise operations (max, one
 * division, one product, rounding), then share the rest. */
#include <immintrin.h>
#include <math.h>
#include <string.h>
#include "ab_i8.h"

/* Lanes k..k+15 below e. */
AB_INLINE __mmask16 q8_lanes(int k, int e) {
    int n = e - k;
    return n >= 16 ? (__mmask16)0xFFFF : n <= 0 ? (__mmask16)0 : (__mmask16)((1u << n) - 1);
}

/* float32 -> float16 (round to nearest even, subnormals and overflow included) -> float32. */
static float f16_round(float f) {
    uint32_t u;
    memcpy(&u, &f, 4);
    uint32_t sign = u & 0x80000000u, a = u ^ sign;
    float r;
    if (a >= 0x7F800000u) return f;                             /* inf, nan */
    if (a >= 0x477FF000u) {                                     /* >= 65520 rounds to inf */
        a = 0x7F800000u;
        memcpy(&r, &a, 4);
    } else if (a < 0x38800000u) {                               /* below 2^-14: the subnormal step 2^-24 */
        memcpy(&r, &a, 4);
        r = rintf(r * 16777216.0f) * (1.0f / 16777216.0f);      /* exact scalings by powers of two */
    } else {
        a += 0xFFFu + ((a >> 13) & 1u);                         /* round the 13 dropped bits to even */
        a &= ~0x1FFFu;
        memcpy(&r, &a, 4);
    }
    return sign ? -r : r;
}

/* Block j of the row: codes q (ar lanes; 0 past K) and its scale d >= 0. */
static void q8_block_portable(const float *x, int k0, int ar, int K, int16_t *q, float *d) {
    int k1 = k0 + ar < K ? k0 + ar : K;
    if (ar == 32) {
        float amax = 0.0f;
        for (int k = k0; k < k1; k++) amax = fabsf(x[k]) > amax ? fabsf(x[k]) : amax;
        *d = f16_round(amax / 127.0f);
        float id = *d != 0.0f ? 127.0f / amax : 0.0f;       /* d = 0: every value is 0 (and 127/amax may be inf) */
        for (int k = k0; k < k0 + ar; k++) q[k - k0] = (int16_t)(k < k1 ? rintf(x[k] * id) : 0.0f);
        return;
    }
    float amax = 0.0f, mx = 0.0f;
    for (int k = k0; k < k1; k++)
        if (fabsf(x[k]) > amax) { amax = fabsf(x[k]); mx = x[k]; }
    float iscale = -127.0f / mx, sg = mx > 0.0f ? -1.0f : 1.0f;     /* sg: the sign of d */
    if (amax == 0.0f || isinf(iscale)) {                            /* then d = 0: every value is 0 */
        memset(q, 0, (size_t)ar * sizeof(int16_t));
        *d = 0.0f;
        return;
    }
    for (int k = k0; k < k0 + ar; k++) {
        float v = k < k1 ? rintf(iscale * x[k]) : 0.0f;
        q[k - k0] = (int16_t)(sg * (v > 127.0f ? 127.0f : v));
    }
    *d = sg * (1.0f / iscale);
}

AB_AVX512 static void q8_block_avx512(const float *x, int k0, int ar, int K, int16_t *q, float *d) {
    int k1 = k0 + ar < K ? k0 + ar : K;
    __m512 va = _mm512_setzero_ps();
    for (int k = k0; k < k0 + ar; k += 16)
        va = _mm512_max_ps(va, _mm512_abs_ps(_mm512_maskz_loadu_ps(q8_lanes(k, k1), x + k)));
    float amax = _mm512_reduce_max_ps(va), mul, sg = 1.0f;
    if (ar == 32) {
        *d = f16_round(amax / 127.0f);
        mul = *d != 0.0f ? 127.0f / amax : 0.0f;
    } else {
        float mx = 0.0f;             /* the first element of largest |x| (the scalar loop's strict >) */
        for (int k = k0; k < k1; k += 16) {
            __m512 v = _mm512_maskz_loadu_ps(q8_lanes(k, k1), x + k);
            __mmask16 hit = _mm512_cmp_ps_mask(_mm512_abs_ps(v), _mm512_set1_ps(amax), _CMP_EQ_OQ) & q8_lanes(k, k1);
            if (hit) { mx = x[k + __builtin_ctz(hit)]; break; }
        }
        mul = -127.0f / mx;
        if (amax == 0.0f || isinf(mul)) {
            memset(q, 0, (size_t)ar * sizeof(int16_t));
            *d = 0.0f;
            return;
        }
        sg = mx > 0.0f ? -1.0f : 1.0f;
        *d = sg * (1.0f / mul);
    }
    const __m512 vmul = _mm512_set1_ps(mul), vsg = _mm512_set1_ps(sg);
    const __m512 top = _mm512_set1_ps(ar == 32 ? 3.0e38f : 127.0f);        /* Q8_0 needs no clamp */
    for (int k = k0; k < k0 + ar; k += 16) {
        __m512 r = _mm512_roundscale_ps(_mm512_mul_ps(_mm512_maskz_loadu_ps(q8_lanes(k, k1), x + k), vmul),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
        r = _mm512_mul_ps(_mm512_min_ps(r, top), vsg);
        _mm256_storeu_si256((__m256i *)(q + (k - k0)), _mm512_cvtepi32_epi16(_mm512_cvtps_epi32(r)));
    }
}

/* The row in q8 form: per grid block q and d, then (shared by every isa) x16 = q, its byte halves, the
 * table blocks' scales d and code sums, and group sums of d * q in double (each product exact). */
void ab_q8_quantize_row(const i8_ctx *c, int m) {
    const float *x = c->x + (size_t)m * c->K;
    int16_t *q16 = c->x16 + (size_t)m * c->Kp;
    int8_t *qh = c->xh + (size_t)m * c->Kp, *ql = c->xl + (size_t)m * c->Kp;
    float *sx = c->sx + (size_t)m * c->nb;
    uint32_t P1 = (1u << c->p) - 1;
    for (int k0 = 0; k0 < c->Kp; k0 += c->ar) {
        int16_t qb[256];
        float d;
        if (c->isa == AB_ISA_AVX512) q8_block_avx512(x, k0, c->ar, c->K, qb, &d);
        else q8_block_portable(x, k0, c->ar, c->K, qb, &d);
        int n = c->Kp - k0 < c->ar ? c->Kp - k0 : c->ar;       /* the last block may end at Kp */
        memcpy(q16 + k0, qb, (size_t)n * sizeof(int16_t));
        for (int b = k0 / c->L; b < (k0 + n) / c->L; b++) sx[b] = d;
    }
    double g = 0.0;
    for (int b = 0; b < c->nb; b++) {
        int32_t s = 0;
        for (int k = b * c->L; k < (b + 1) * c->L; k++) {
            int v = q16[k], h = (v + 128) >> 8;
            qh[k] = (int8_t)h;
            ql[k] = (int8_t)(v - 256 * h);
            s += v;
        }
        c->px[(size_t)m * c->nb + b] = (int32_t)((uint32_t)s * P1);
        g += (double)sx[b] * (double)s;
        if (((b + 1) * c->L) % c->G == 0) {
            c->gs[(size_t)m * c->ng + (b + 1) * c->L / c->G - 1] = (float)g;
            g = 0.0;
        }
    }
}

static int gcd(int a, int b) {
    while (b) { int t = a % b; a = b; b = t; }
    return a;
}

/* Lanes per block of the product for weight group G: ab_a16_block(G), and with a q8 rounding block ar
 * the part of it that divides ar too, so that no block spans two grid blocks (a block must hold whole
 * 16-lane rows of the 2-bit code tiles). */
int ab_i8_block(int G, int ar) {
    if (G <= 0 || !(ar == 0 || ar == 32 || ar == 256)) return -3;
    int L = ab_a16_block(G);
    if (!ar) return L;
    L = gcd(L, ar);
    return L % 16 ? -3 : L;
}

int ab_linear_i8_q8(ab_pool *pool, int isa, const uint8_t *codes, const void *wsc, const void *woff, int f16,
                    int p, int cw, int N, int Kp, int G, const float *x, int M, int K, int ar, float *y) {
    if (isa < 0 || isa > AB_ISA_AVX512 || !(ab_isa_available() >> isa & 1)) return -2;
    if (ar != 32 && ar != 256) return -3;
    return ab_i8_run(pool, isa, codes, wsc, woff, f16, p, cw, N, Kp, G, x, M, K, ar, y, NULL);
}
