/* Transformer ops of the CPU backend interface (docs/DESIGN.md), fp32 in and out with float/double
 * accumulation. Plain C: -O3 vectorizes the inner loops for the baseline ISA, and these ops move far
 * fewer bytes than the linears. Row-parallel work goes through the pool. */
#include <math.h>
#include <stdlib.h>
#include <string.h>
#include "ab_internal.h"

typedef struct {
    const float *x, *w, *b;
    float *out;
    int M, d;
    float eps;
} norm_ctx;

static void rms_task(void *ctx, int m) {
    norm_ctx *c = ctx;
    const float *x = c->x + (size_t)m * c->d;
    float *o = c->out + (size_t)m * c->d;
    /* eight partial sums (one chain of dependent double adds took longer than the rest of the op) */
    double l[8] = {0, 0, 0, 0, 0, 0, 0, 0};
    int i = 0;
    for (; i + 8 <= c->d; i += 8)
        for (int e = 0; e < 8; e++) l[e] += (double)x[i + e] * x[i + e];
    for (; i < c->d; i++) l[i % 8] += (double)x[i] * x[i];
    double ss = ((l[0] + l[1]) + (l[2] + l[3])) + ((l[4] + l[5]) + (l[6] + l[7]));
    float inv = (float)(1.0 / sqrt(ss / c->d + c->eps));
    for (int i = 0; i < c->d; i++) o[i] = x[i] * inv * c->w[i];
}

void ab_rmsnorm(ab_pool *pool, const float *x, const float *w, int M, int d, float eps, float *out) {
    norm_ctx c = {x, w, NULL, out, M, d, eps};
    ab_pool_run(pool, rms_task, &c, M);
}

static void ln_task(void *ctx, int m) {
    norm_ctx *c = ctx;
    const float *x = c->x + (size_t)m * c->d;
    float *o = c->out + (size_t)m * c->d;
    double s = 0.0;
    for (int i = 0; i < c->d; i++) s += x[i];
    double mean = s / c->d, v = 0.0;
    for (int i = 0; i < c->d; i++) v += ((double)x[i] - mean) * ((double)x[i] - mean);
    float inv = (float)(1.0 / sqrt(v / c->d + c->eps)), mu = (float)mean;
    for (int i = 0; i < c->d; i++) o[i] = (x[i] - mu) * inv * c->w[i] + c->b[i];
}

void ab_layernorm(ab_pool *pool, const float *x, const float *w, const float *b, int M, int d, float eps,
                  float *out) {
    norm_ctx c = {x, w, b, out, M, d, eps};
    ab_pool_run(pool, ln_task, &c, M);
}

/* Rotation table of M positions: cs/sn (M, n_rot/2) = cos/sin(pos * theta^(-2i/n_rot) / freqs[i]) in double
 * (freqs: per-pair frequency divisors, Llama 3's rope_freqs, or NULL). Built once per step and shared by
 * every rope op of the graph that has the same parameters (kernels_graph.c), so the pow/sin/cos cost is
 * paid per token, not per op and head. */
void ab_rope_table(const int32_t *pos, int M, int n_rot, float theta, const float *freqs, double *cs, double *sn) {
    int half = n_rot / 2;
    for (int i = 0; i < half; i++) {
        double f = pow((double)theta, -2.0 * i / n_rot);
        if (freqs) f /= (double)freqs[i];
        for (int m = 0; m < M; m++) {
            double a = (double)pos[m] * f;
            cs[(size_t)m * half + i] = cos(a);
            sn[(size_t)m * half + i] = sin(a);
        }
    }
}

typedef struct {
    float *x;
    const double *cs, *sn;
    int H, hd, n_rot, style;
} rope_ctx;

/* Pair i of the first n_rot dims of every head of row m rotates by the table angle (n_rot = hd: all of
 * them); style 0 pairs (2i, 2i+1), style 1 (i, i + n_rot/2). The other dims stay as they are. */
static void rope_task(void *ctx, int m) {
    rope_ctx *c = ctx;
    int half = c->n_rot / 2;
    const double *cs = c->cs + (size_t)m * half, *sn = c->sn + (size_t)m * half;
    for (int h = 0; h < c->H; h++) {
        float *x = c->x + ((size_t)m * c->H + h) * c->hd;
        for (int i = 0; i < half; i++) {
            int i0 = c->style ? i : 2 * i, i1 = c->style ? i + half : 2 * i + 1;
            double a = x[i0], b = x[i1];
            x[i0] = (float)(a * cs[i] - b * sn[i]);
            x[i1] = (float)(a * sn[i] + b * cs[i]);
        }
    }
}

void ab_rope_apply_partial(ab_pool *pool, float *x, int M, int H, int hd, int n_rot, int style, const double *cs,
                           const double *sn) {
    rope_ctx c = {x, cs, sn, H, hd, n_rot, style};
    ab_pool_run(pool, rope_task, &c, M);
}

void ab_rope_apply(ab_pool *pool, float *x, int M, int H, int hd, int style, const double *cs, const double *sn) {
    ab_rope_apply_partial(pool, x, M, H, hd, hd, style, cs, sn);
}

int ab_rope(ab_pool *pool, float *x, const int32_t *pos, int M, int H, int hd, float theta, int style) {
    if (M <= 0 || hd < 2) return 0;
    double *t = malloc((size_t)M * (hd / 2) * 2 * sizeof(double));
    if (!t) return -1;
    ab_rope_table(pos, M, hd, theta, NULL, t, t + (size_t)M * (hd / 2));
    ab_rope_apply(pool, x, M, H, hd, style, t, t + (size_t)M * (hd / 2));
    free(t);
    return 0;
}

typedef struct {
    const float *a, *b;
    float *out;
    int64_t n;
    int op, isa;
} ew_ctx;

#define EW_CHUNK 16384

/* silu(g) * u = g / (1 + exp(-g)) * u, sixteen or eight lanes at a time (vector exp: ab_internal.h). */
AB_AVX512 static void swiglu_avx512(const float *g, const float *u, float *o, int64_t i0, int64_t i1) {
    const __m512 one = _mm512_set1_ps(1.0f);
    for (int64_t i = i0; i < i1; i += 16) {
        __mmask16 mk = i1 - i >= 16 ? 0xFFFF : (__mmask16)((1u << (i1 - i)) - 1);
        __m512 a = _mm512_maskz_loadu_ps(mk, g + i);
        __m512 e = exp512(_mm512_sub_ps(_mm512_setzero_ps(), a));
        __m512 y = _mm512_mul_ps(_mm512_div_ps(a, _mm512_add_ps(one, e)), _mm512_maskz_loadu_ps(mk, u + i));
        _mm512_mask_storeu_ps(o + i, mk, y);
    }
}

/* gelu_tanh(g) * u: 0.5 g (1 + tanh(t)) = g / (1 + exp(-2t)), t = sqrt(2/pi) (g + 0.044715 g^3); the
 * second form has no cancellation near t = 0 and needs only the vector exp (the scalar loop's tanhf was
 * a few percent of a Gemma decode step). */
AB_AVX512 static void geglu_avx512(const float *g, const float *u, float *o, int64_t i0, int64_t i1) {
    const __m512 one = _mm512_set1_ps(1.0f), k2 = _mm512_set1_ps(-2.0f * 0.7978845608028654f),
                 c3 = _mm512_set1_ps(0.044715f);
    for (int64_t i = i0; i < i1; i += 16) {
        __mmask16 mk = i1 - i >= 16 ? 0xFFFF : (__mmask16)((1u << (i1 - i)) - 1);
        __m512 a = _mm512_maskz_loadu_ps(mk, g + i);
        __m512 t = _mm512_mul_ps(k2, _mm512_add_ps(a, _mm512_mul_ps(c3, _mm512_mul_ps(a, _mm512_mul_ps(a, a)))));
        __m512 y = _mm512_mul_ps(_mm512_div_ps(a, _mm512_add_ps(one, exp512(t))), _mm512_maskz_loadu_ps(mk, u + i));
        _mm512_mask_storeu_ps(o + i, mk, y);
    }
}

AB_AVX2 static int64_t swiglu_avx2(const float *g, const float *u, float *o, int64_t i0, int64_t i1) {
    const __m256 one = _mm256_set1_ps(1.0f);
    int64_t i = i0;
    for (; i + 8 <= i1; i += 8) {
        __m256 a = _mm256_loadu_ps(g + i);
        __m256 e = exp256(_mm256_sub_ps(_mm256_setzero_ps(), a));
        _mm256_storeu_ps(o + i, _mm256_mul_ps(_mm256_div_ps(a, _mm256_add_ps(one, e)), _mm256_loadu_ps(u + i)));
    }
    return i;           /* the tail is left to the scalar loop */
}

static void ew_task(void *ctx, int task) {
    ew_ctx *c = ctx;
    int64_t i0 = (int64_t)task * EW_CHUNK, i1 = i0 + EW_CHUNK < c->n ? i0 + EW_CHUNK : c->n;
    const float *a = c->a, *b = c->b;
    float *o = c->out;
    if (c->op == 0) {
        for (int64_t i = i0; i < i1; i++) o[i] = a[i] + b[i];
    } else if (c->op == 1) {
        if (c->isa == AB_ISA_AVX512) { swiglu_avx512(a, b, o, i0, i1); return; }
        if (c->isa == AB_ISA_AVX2) i0 = swiglu_avx2(a, b, o, i0, i1);
        for (int64_t i = i0; i < i1; i++) o[i] = a[i] / (1.0f + expf(-a[i])) * b[i];
    } else if (c->op == 3) {
        if (c->isa == AB_ISA_AVX512) { geglu_avx512(a, b, o, i0, i1); return; }
        for (int64_t i = i0; i < i1; i++) {
            float x = a[i], t = tanhf(0.7978845608028654f * (x + 0.044715f * x * x * x));
            o[i] = 0.5f * x * (1.0f + t) * b[i];
        }
    } else {
        for (int64_t i = i0; i < i1; i++) o[i] = 0.5f * a[i] * (1.0f + erff(a[i] * 0.70710678118654752f));
    }
}

static void ew_run(ab_pool *pool, const float *a, const float *b, int64_t n, float *out, int op, int isa) {
    ew_ctx c = {a, b, out, n, op, isa};
    ab_pool_run(pool, ew_task, &c, (int)((n + EW_CHUNK - 1) / EW_CHUNK));
}

void ab_add(ab_pool *pool, const float *a, const float *b, int64_t n, float *out) { ew_run(pool, a, b, n, out, 0, 0); }
int ab_swiglu(ab_pool *pool, int isa, const float *g, const float *u, int64_t n, float *out) {
    if (isa < 0 || isa > AB_ISA_AVX512 || !(ab_isa_available() >> isa & 1)) return -2;
    ew_run(pool, g, u, n, out, 1, isa);
    return 0;
}
void ab_gelu(ab_pool *pool, const float *x, int64_t n, float *out) { ew_run(pool, x, NULL, n, out, 2, 0); }
int ab_geglu_tanh(ab_pool *pool, int isa, const float *g, const float *u, int64_t n, float *out) {
    if (isa < 0 || isa > AB_ISA_AVX512 || !(ab_isa_available() >> isa & 1)) return -2;
    ew_run(pool, g, u, n, out, 3, isa);
    return 0;
}

/* First index of the maximum (NumPy's argmax rule; a NaN wins, as there). */
int64_t ab_argmax(const float *x, int64_t n) {
    int64_t best = 0;
    for (int64_t i = 0; i < n; i++) {
        if (x[i] != x[i]) return i;
        if (x[i] > x[best]) best = i;
    }
    return best;
}
