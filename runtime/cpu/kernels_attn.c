/* Attention over a float32 KV cache (n_ctx keys of layout [T][Hkv][hd]): causal by query position, or
 * bidirectional over the unmasked keys. Grouped heads: head h reads kv head h / (H / Hkv).
 *
 * Work is split like flash-decoding: one task per (query row, chunk of ATT_CHUNK keys) handles every
 * query head, so each key and value row is read from memory once, front to back, rather than once per
 * head, and a single query's long context still spreads over the threads. A task leaves,
 * per head, its chunk's maximum score, the sum of exp(score - max) and the unnormalised output; a merge
 * pass rescales the chunks to the global maximum. Scores and exponentials stay in float32.
 *
 * Why SIMD: a scalar float dot product is a chain of dependent adds, which made attention a quarter of
 * the decode step at a few hundred tokens of context. The AVX-512 and AVX2 paths keep hd / 16 (or / 8)
 * lanes per key, and the exponential is a vector polynomial (Cody-Waite reduction, degree-6 minimax
 * on [-ln2/2, ln2/2], about 2 ulp). The paths agree to float tolerance, not bitwise: attention is not an
 * integer product (tests compare every path with a float64 NumPy reference).
 */
#include <immintrin.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>
#include "ab_internal.h"

#define ATT_CHUNK 128       /* most keys per task (the score buffer's size) */
#define ATT_HB 4            /* query heads per value pass (its register budget) */
#define ATT_HS 16           /* query heads per task pass over a chunk (the score buffer's size) */
#define ATT_PF 16           /* keys prefetched ahead in the score pass */

typedef struct {
    const float *q, *k, *v;
    const int32_t *qpos;
    const uint8_t *mask;
    float *out;
    int M, H, Hkv, hd, n_ctx, isa, g, nch, chunk, failed;
    float *part;            /* [M][H][nch][2 + hd]: max, sum, unnormalised output */
    float scale, softcap;   /* score scale; > 0: scores soft-capped to (-softcap, softcap) */
    int window;             /* > 0: query m sees keys qpos[m] - window + 1 .. qpos[m] only */
} attn_ctx;

/* Keys visible to query m: indices 0..last (masked ones excluded later); -1 when none. */
static int attn_last(const attn_ctx *c, int m) {
    int last = c->n_ctx - 1;
    if (!c->mask && c->qpos[m] < last) last = c->qpos[m];
    return last;
}

static inline float *part_at(const attn_ctx *c, int m, int h, int ch) {
    return c->part + (((size_t)m * c->H + h) * c->nch + ch) * (size_t)(2 + c->hd);
}

/* s[hh][j - j0] = scaled scores of heads h0..h0+hb-1 (-inf where masked). */
static void scores_portable(const attn_ctx *c, int m, int hk, int h0, int hb, int j0, int j1, float *s) {
    size_t ks = (size_t)c->Hkv * c->hd;
    float scale = c->scale;
    for (int hh = 0; hh < hb; hh++) {
        const float *q = c->q + ((size_t)m * c->H + h0 + hh) * c->hd;
        for (int j = j0; j < j1; j++) {
            float *sj = s + hh * ATT_CHUNK + (j - j0);
            if (c->mask && !c->mask[j]) { *sj = -INFINITY; continue; }
            if (c->window && j <= c->qpos[m] - c->window) { *sj = -INFINITY; continue; }
            const float *k = c->k + j * ks + (size_t)hk * c->hd;
            float d = 0.0f;
            for (int i = 0; i < c->hd; i++) d += q[i] * k[i];
            *sj = c->softcap > 0.0f ? c->softcap * tanhf(d * scale / c->softcap) : d * scale;
        }
    }
}

/* exp of the scores in place (relative to each head's max) and that head's max and sum in part. */
static void softmax_portable(int hb, int n, float *s, float **pp) {
    for (int hh = 0; hh < hb; hh++) {
        float *sh = s + hh * ATT_CHUNK, mx = -INFINITY, den = 0.0f;
        for (int j = 0; j < n; j++) mx = sh[j] > mx ? sh[j] : mx;
        for (int j = 0; j < n; j++) {
            sh[j] = mx == -INFINITY || sh[j] == -INFINITY ? 0.0f : expf(sh[j] - mx);
            den += sh[j];
        }
        pp[hh][0] = mx;
        pp[hh][1] = den;
    }
}

static void values_portable(const attn_ctx *c, int hk, int hb, int j0, int j1, const float *s, float **pp) {
    size_t ks = (size_t)c->Hkv * c->hd;
    for (int hh = 0; hh < hb; hh++) {
        float *o = pp[hh] + 2;
        memset(o, 0, (size_t)c->hd * sizeof(float));
        for (int j = j0; j < j1; j++) {
            float e = s[hh * ATT_CHUNK + j - j0];
            if (e == 0.0f) continue;
            const float *v = c->v + j * ks + (size_t)hk * c->hd;
            for (int i = 0; i < c->hd; i++) o[i] += e * v[i];
        }
    }
}

/* Lane i of the result: the sum of the 16 lanes of v[i] (a transposed reduction: 45 operations for 16
 * sums, where a horizontal sum per vector takes about 8 plus a scalar store). */
AB_AVX512 AB_INLINE __m512 hsum16x16(const __m512 *v) {
    __m512 a[8], b[4];
    for (int i = 0; i < 8; i++)     /* per 128-bit quarter: partials of v[2i], v[2i+1], v[2i], v[2i+1] */
        a[i] = _mm512_add_ps(_mm512_unpacklo_ps(v[2 * i], v[2 * i + 1]), _mm512_unpackhi_ps(v[2 * i], v[2 * i + 1]));
    for (int i = 0; i < 4; i++)     /* per quarter: partials of v[4i .. 4i+3] */
        b[i] = _mm512_add_ps(_mm512_shuffle_ps(a[2 * i], a[2 * i + 1], _MM_SHUFFLE(1, 0, 1, 0)),
                             _mm512_shuffle_ps(a[2 * i], a[2 * i + 1], _MM_SHUFFLE(3, 2, 3, 2)));
    __m512 c0 = _mm512_add_ps(_mm512_shuffle_f32x4(b[0], b[1], _MM_SHUFFLE(2, 0, 2, 0)),
                              _mm512_shuffle_f32x4(b[0], b[1], _MM_SHUFFLE(3, 1, 3, 1)));
    __m512 c1 = _mm512_add_ps(_mm512_shuffle_f32x4(b[2], b[3], _MM_SHUFFLE(2, 0, 2, 0)),
                              _mm512_shuffle_f32x4(b[2], b[3], _MM_SHUFFLE(3, 1, 3, 1)));
    return _mm512_add_ps(_mm512_shuffle_f32x4(c0, c1, _MM_SHUFFLE(2, 0, 2, 0)),
                         _mm512_shuffle_f32x4(c0, c1, _MM_SHUFFLE(3, 1, 3, 1)));
}

/* Heads hg .. hg+hb-1 (hb <= ATT_HS, any kv heads) over keys j0..j1-1: each key row is read once, front to
 * back, for all of them (a task per kv head read a 1/Hkv slice of every row, a strided stream that the
 * prefetchers left waiting on memory), and its value row asked for ahead of the value pass. Keys go in
 * runs of 16: per key and head the products summed into one vector, then the 16 keys' vectors reduced
 * together (hsum16x16). */
AB_AVX512 static void scores_avx512(const attn_ctx *c, int m, int hg, int hb, int j0, int j1, float *s) {
    int hd = c->hd, nv = (hd + 15) / 16, g = c->g;
    size_t ks = (size_t)c->Hkv * hd;
    int hk0 = hg / g, hk1 = (hg + hb - 1) / g;
    size_t off = (size_t)hk0 * hd, span = (size_t)(hk1 - hk0 + 1) * hd;     /* the heads' part of a row */
    const __m512 scale = _mm512_set1_ps(c->scale);
    const float *q0 = c->q + ((size_t)m * c->H + hg) * hd;
    __m512 acc[ATT_HS][16];
    for (int j = j0; j < j1 && j < j0 + ATT_PF; j++)     /* the first keys, not asked for ahead below */
        for (size_t i = 0; i < span; i += 16) _mm_prefetch((const char *)(c->k + (size_t)j * ks + off + i), _MM_HINT_T0);
    for (int r0 = j0; r0 < j1; r0 += 16) {
        int nr = j1 - r0 < 16 ? j1 - r0 : 16;
        for (int jj = 0; jj < 16; jj++) {
            if (jj >= nr) {
                for (int hh = 0; hh < hb; hh++) acc[hh][jj] = _mm512_setzero_ps();
                continue;
            }
            const float *krow = c->k + (size_t)(r0 + jj) * ks, *vrow = c->v + (size_t)(r0 + jj) * ks;
            for (size_t i = 0; i < span; i += 16) {
                if (r0 + jj + ATT_PF < j1) _mm_prefetch((const char *)(krow + ATT_PF * ks + off + i), _MM_HINT_T0);
                _mm_prefetch((const char *)(vrow + off + i), _MM_HINT_T0);
            }
            for (int hh = 0; hh < hb; hh++) {
                const float *k = krow + (size_t)((hg + hh) / g) * hd, *q = q0 + (size_t)hh * hd;
                __m512 a = _mm512_setzero_ps();
                for (int i = 0; i < nv; i++) {
                    __mmask16 mk = 16 * i + 16 <= hd ? 0xFFFF : (__mmask16)((1u << (hd - 16 * i)) - 1);
                    a = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(mk, q + 16 * i), _mm512_maskz_loadu_ps(mk, k + 16 * i), a);
                }
                acc[hh][jj] = a;
            }
        }
        __mmask16 live = (__mmask16)((1u << nr) - 1);
        if (c->mask)
            for (int jj = 0; jj < nr; jj++)
                if (!c->mask[r0 + jj]) live &= (__mmask16)~(1u << jj);
        const __m512 ninf = _mm512_set1_ps(-INFINITY);
        for (int hh = 0; hh < hb; hh++) {
            __m512 sc = _mm512_mask_mov_ps(ninf, live, _mm512_mul_ps(hsum16x16(acc[hh]), scale));
            _mm512_mask_storeu_ps(s + hh * ATT_CHUNK + r0 - j0, (__mmask16)((1u << nr) - 1), sc);
        }
    }
}

AB_AVX512 static void softmax_avx512(int hb, int n, float *s, float **pp) {
    for (int hh = 0; hh < hb; hh++) {
        float *sh = s + hh * ATT_CHUNK;
        __m512 vm = _mm512_set1_ps(-INFINITY);
        for (int j = 0; j < n; j += 16) {
            __mmask16 mk = n - j >= 16 ? 0xFFFF : (__mmask16)((1u << (n - j)) - 1);
            vm = _mm512_mask_max_ps(vm, mk, vm, _mm512_maskz_loadu_ps(mk, sh + j));
        }
        float mx = _mm512_reduce_max_ps(vm);
        __m512 vmx = _mm512_set1_ps(mx), vden = _mm512_setzero_ps();
        for (int j = 0; j < n; j += 16) {
            __mmask16 mk = n - j >= 16 ? 0xFFFF : (__mmask16)((1u << (n - j)) - 1);
            __m512 x = _mm512_maskz_loadu_ps(mk, sh + j);
            /* a masked key (-inf), or a chunk with no visible key, gives exactly 0 */
            __mmask16 live = _mm512_mask_cmp_ps_mask(mk, x, _mm512_set1_ps(-INFINITY), _CMP_NEQ_OQ);
            __m512 e = _mm512_maskz_mov_ps(live, exp512(_mm512_sub_ps(x, vmx)));
            _mm512_mask_storeu_ps(sh + j, mk, e);
            vden = _mm512_add_ps(vden, e);
        }
        pp[hh][0] = mx;
        pp[hh][1] = _mm512_reduce_add_ps(vden);
    }
}

/* Four vectors (64 dims) of HB heads at a time: 4 HB accumulators in registers. */
AB_AVX512 AB_INLINE void values_hb_avx512(const attn_ctx *c, int hk, int j0, int j1, const float *s, float **pp,
                                          const int HB) {
    int hd = c->hd;
    size_t ks = (size_t)c->Hkv * hd;
    for (int d0 = 0; d0 < hd; d0 += 64) {
        __mmask16 mk[4];
        for (int u = 0; u < 4; u++) {
            int r = hd - d0 - 16 * u;
            mk[u] = r >= 16 ? 0xFFFF : r <= 0 ? 0 : (__mmask16)((1u << r) - 1);
        }
        __m512 acc[ATT_HB][4];
        for (int hh = 0; hh < HB; hh++)
            for (int u = 0; u < 4; u++) acc[hh][u] = _mm512_setzero_ps();
        for (int j = j0; j < j1; j++) {
            const float *v = c->v + j * ks + (size_t)hk * hd + d0;
            __m512 vv[4];
            for (int u = 0; u < 4; u++) vv[u] = _mm512_maskz_loadu_ps(mk[u], v + 16 * u);
            for (int hh = 0; hh < HB; hh++) {
                __m512 e = _mm512_set1_ps(s[hh * ATT_CHUNK + j - j0]);
                for (int u = 0; u < 4; u++) acc[hh][u] = _mm512_fmadd_ps(e, vv[u], acc[hh][u]);
            }
        }
        for (int hh = 0; hh < HB; hh++)
            for (int u = 0; u < 4; u++) _mm512_mask_storeu_ps(pp[hh] + 2 + d0 + 16 * u, mk[u], acc[hh][u]);
    }
}

AB_AVX512 static void values_avx512(const attn_ctx *c, int hk, int hb, int j0, int j1, const float *s, float **pp) {
    if (hb == 1) values_hb_avx512(c, hk, j0, j1, s, pp, 1);
    else if (hb == 2) values_hb_avx512(c, hk, j0, j1, s, pp, 2);
    else if (hb == 3) values_hb_avx512(c, hk, j0, j1, s, pp, 3);
    else values_hb_avx512(c, hk, j0, j1, s, pp, 4);
}

AB_AVX2 static inline float hsum256(__m256 a) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

/* hd a multiple of 8 (attn_task checks; other head sizes take the portable path). */
AB_AVX2 static void scores_avx2(const attn_ctx *c, int m, int hk, int h0, int hb, int j0, int j1, float *s) {
    int hd = c->hd, nv = hd / 8;
    size_t ks = (size_t)c->Hkv * hd;
    float scale = c->scale;
    const float *q0 = c->q + ((size_t)m * c->H + h0) * hd;
    for (int j = j0; j < j1; j++) {
        if (c->mask && !c->mask[j]) {
            for (int hh = 0; hh < hb; hh++) s[hh * ATT_CHUNK + j - j0] = -INFINITY;
            continue;
        }
        const float *k = c->k + j * ks + (size_t)hk * hd;
        for (int hh = 0; hh < hb; hh++) {
            const float *q = q0 + (size_t)hh * hd;
            __m256 a = _mm256_setzero_ps(), b = _mm256_setzero_ps();
            int i = 0;
            for (; i + 2 <= nv; i += 2) {
                a = _mm256_fmadd_ps(_mm256_loadu_ps(q + 8 * i), _mm256_loadu_ps(k + 8 * i), a);
                b = _mm256_fmadd_ps(_mm256_loadu_ps(q + 8 * i + 8), _mm256_loadu_ps(k + 8 * i + 8), b);
            }
            if (i < nv) a = _mm256_fmadd_ps(_mm256_loadu_ps(q + 8 * i), _mm256_loadu_ps(k + 8 * i), a);
            s[hh * ATT_CHUNK + j - j0] = hsum256(_mm256_add_ps(a, b)) * scale;
        }
    }
}

AB_AVX2 static void softmax_avx2(int hb, int n, float *s, float **pp) {
    for (int hh = 0; hh < hb; hh++) {
        float *sh = s + hh * ATT_CHUNK, mx = -INFINITY;
        for (int j = 0; j < n; j++) mx = sh[j] > mx ? sh[j] : mx;
        __m256 vmx = _mm256_set1_ps(mx), vden = _mm256_setzero_ps();
        int j = 0;
        for (; j + 8 <= n; j += 8) {
            __m256 x = _mm256_loadu_ps(sh + j);
            __m256 live = _mm256_cmp_ps(x, _mm256_set1_ps(-INFINITY), _CMP_NEQ_OQ);
            __m256 e = _mm256_and_ps(live, exp256(_mm256_sub_ps(x, vmx)));
            _mm256_storeu_ps(sh + j, e);
            vden = _mm256_add_ps(vden, e);
        }
        float den = hsum256(vden);
        for (; j < n; j++) {
            sh[j] = sh[j] == -INFINITY ? 0.0f : expf(sh[j] - mx);
            den += sh[j];
        }
        pp[hh][0] = mx;
        pp[hh][1] = den;
    }
}

AB_AVX2 static void values_avx2(const attn_ctx *c, int hk, int hb, int j0, int j1, const float *s, float **pp) {
    int hd = c->hd;
    size_t ks = (size_t)c->Hkv * hd;
    for (int hh = 0; hh < hb; hh++) {
        const float *sh = s + hh * ATT_CHUNK;
        for (int d0 = 0; d0 < hd; d0 += 32) {
            int cnt = (hd - d0) / 8 < 4 ? (hd - d0) / 8 : 4;
            __m256 acc[4] = {_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps()};
            for (int j = j0; j < j1; j++) {
                if (sh[j - j0] == 0.0f) continue;
                __m256 e = _mm256_set1_ps(sh[j - j0]);
                const float *v = c->v + j * ks + (size_t)hk * hd + d0;
                for (int u = 0; u < cnt; u++) acc[u] = _mm256_fmadd_ps(e, _mm256_loadu_ps(v + 8 * u), acc[u]);
            }
            for (int u = 0; u < cnt; u++) _mm256_storeu_ps(pp[hh] + 2 + d0 + 8 * u, acc[u]);
        }
    }
}

/* One (query row, chunk of keys): every head, ATT_HS at a time. A kv head's query heads score together
 * (AVX2, portable) or all heads of the pass key by key (AVX-512); values per kv head. */
static void attn_task(void *ctx, int task) {
    attn_ctx *c = ctx;
    int ch = task % c->nch, m = task / c->nch;
    int j0 = ch * c->chunk, j1 = j0 + c->chunk, last = attn_last(c, m);
    j1 = j1 <= last + 1 ? j1 : last + 1;
    /* a window: the chunk's keys from the first one it shows (the keys before it would weigh exactly 0) */
    if (c->window && j0 < c->qpos[m] - c->window + 1) j0 = c->qpos[m] - c->window + 1;
    int n = j1 > j0 ? j1 - j0 : 0;
    float s[ATT_HS * ATT_CHUNK] __attribute__((aligned(64)));
    /* the vector paths score plainly: soft-capping takes the portable one */
    int isa = (c->isa == AB_ISA_AVX2 && c->hd % 8) || c->softcap > 0.0f ? AB_ISA_PORTABLE : c->isa;
    for (int hg = 0; hg < c->H; hg += ATT_HS) {
        int hb = c->H - hg < ATT_HS ? c->H - hg : ATT_HS;
        float *pp[ATT_HS];
        for (int hh = 0; hh < hb; hh++) pp[hh] = part_at(c, m, hg + hh, ch);
        if (n == 0) {           /* nothing visible in this chunk: weight 0 in the merge */
            for (int hh = 0; hh < hb; hh++) { pp[hh][0] = -INFINITY; pp[hh][1] = 0.0f; }
            continue;
        }
        if (isa == AB_ISA_AVX512) scores_avx512(c, m, hg, hb, j0, j1, s);
        for (int h = hg; h < hg + hb;) {        /* the pass's heads, a kv head's run at a time */
            int hk = h / c->g, hz = (hk + 1) * c->g < hg + hb ? (hk + 1) * c->g : hg + hb;
            float *sh = s + (size_t)(h - hg) * ATT_CHUNK, **ph = pp + (h - hg);
            if (isa == AB_ISA_AVX512) softmax_avx512(hz - h, n, sh, ph);
            else if (isa == AB_ISA_AVX2) {
                scores_avx2(c, m, hk, h, hz - h, j0, j1, sh);
                softmax_avx2(hz - h, n, sh, ph);
            } else {
                scores_portable(c, m, hk, h, hz - h, j0, j1, sh);
                softmax_portable(hz - h, n, sh, ph);
            }
            for (int h0 = h; h0 < hz; h0 += ATT_HB) {
                int hv = hz - h0 < ATT_HB ? hz - h0 : ATT_HB;
                float *sv = s + (size_t)(h0 - hg) * ATT_CHUNK, **pv = pp + (h0 - hg);
                if (isa == AB_ISA_AVX512) values_avx512(c, hk, hv, j0, j1, sv, pv);
                else if (isa == AB_ISA_AVX2) values_avx2(c, hk, hv, j0, j1, sv, pv);
                else values_portable(c, hk, hv, j0, j1, sv, pv);
            }
            h = hz;
        }
    }
}

/* out[m][h] = sum over chunks of o_c * exp(mx_c - mx) / sum of den_c * exp(mx_c - mx); 0 if no key. */
static void merge_task(void *ctx, int task) {
    attn_ctx *c = ctx;
    int m = task / c->H, h = task % c->H, hd = c->hd;
    float *o = c->out + ((size_t)m * c->H + h) * hd, mx = -INFINITY;
    for (int ch = 0; ch < c->nch; ch++) {
        float cm = part_at(c, m, h, ch)[0];
        mx = cm > mx ? cm : mx;
    }
    memset(o, 0, (size_t)hd * sizeof(float));
    if (mx == -INFINITY) return;
    float den = 0.0f;
    for (int ch = 0; ch < c->nch; ch++) {
        const float *pc = part_at(c, m, h, ch);
        if (pc[0] == -INFINITY) continue;
        float w = c->nch == 1 ? 1.0f : expf(pc[0] - mx);
        den += w * pc[1];
        for (int i = 0; i < hd; i++) o[i] += w * pc[2 + i];
    }
    float inv = 1.0f / den;
    for (int i = 0; i < hd; i++) o[i] *= inv;
}

int ab_attention(ab_pool *pool, int isa, const float *q, const float *k, const float *v, int M, int H, int Hkv,
                 int hd, int n_ctx, const int32_t *qpos, const uint8_t *mask, float *out) {
    return ab_attention_ex(pool, isa, q, k, v, M, H, Hkv, hd, n_ctx, qpos, mask, 0.0f, 0, 0.0f, out);
}

/* One attention call's context: checks, then its split into chunks. Equal chunks of at most ATT_CHUNK
 * keys, and enough of them that a single query (decode) gives every thread about two tasks: 160 keys on
 * 2 threads run as 3 tasks of 48 and one of 16, not 128 + 32. */
static int attn_setup(attn_ctx *c, int nthreads, int isa, const float *q, const float *k, const float *v, int M,
                      int H, int Hkv, int hd, int n_ctx, const int32_t *qpos, const uint8_t *mask, float scale,
                      int window, float softcap, float *out) {
    if (isa < 0 || isa > AB_ISA_AVX512 || !(ab_isa_available() >> isa & 1)) return -2;
    if (Hkv <= 0 || H % Hkv || hd < 1 || hd > 4096 || M < 0 || n_ctx < 0 || window < 0 || softcap < 0.0f) return -3;
    if (window && !qpos) return -3;
    int nch = n_ctx > 0 ? (n_ctx + ATT_CHUNK - 1) / ATT_CHUNK : 1;
    int want = M > 0 ? (2 * nthreads + M - 1) / M : 1, most = (n_ctx + 15) / 16;
    if (nch < want) nch = want < most ? want : (most > 0 ? most : 1);
    int chunk = n_ctx > 0 ? ((n_ctx + nch - 1) / nch + 15) / 16 * 16 : ATT_CHUNK;
    chunk = chunk < ATT_CHUNK ? chunk : ATT_CHUNK;
    nch = n_ctx > 0 ? (n_ctx + chunk - 1) / chunk : 1;
    attn_ctx c0 = {q, k, v, qpos, mask, out, M, H, Hkv, hd, n_ctx, isa, H / Hkv, nch, chunk, 0, NULL,
                   scale != 0.0f ? scale : 1.0f / sqrtf((float)hd), softcap, window};
    *c = c0;
    return 0;
}

/* Several attention calls as one: the tasks of call r follow those of calls 0..r-1, so one pool pass
 * scores and one merges them all. Batched decode has a call per sequence (each with its own cache and
 * length); a pass per call would wake the threads twice per sequence and call for a few microseconds
 * of work each. Each call keeps the split it would have alone, so its result is bitwise the same. */
typedef struct {
    attn_ctx *c;
    int n;
    int *first;             /* [n + 1]: first task of each call, per pass */
} attn_multi;

static int multi_find(const attn_multi *mu, int task) {
    int r = 0;
    while (task >= mu->first[r + 1]) r++;
    return r;
}

static void multi_attn_task(void *ctx, int task) {
    attn_multi *mu = ctx;
    int r = multi_find(mu, task);
    attn_task(&mu->c[r], task - mu->first[r]);
}

static void multi_merge_task(void *ctx, int task) {
    attn_multi *mu = ctx;
    int r = multi_find(mu, task);
    merge_task(&mu->c[r], task - mu->first[r]);
}

/* Floats of a call's partial results: [M][H][nch][2 + hd] (max, sum, unnormalised output). */
static size_t attn_part_floats(const attn_ctx *c) {
    return (size_t)c->M * c->H * c->nch * (2 + (size_t)c->hd);
}

static int attn_run(ab_pool *pool, attn_ctx *c, int n) {
    int *first = malloc((size_t)(n + 1) * sizeof(int));
    size_t parts = 0;
    for (int r = 0; r < n; r++) parts += attn_part_floats(&c[r]);
    float *part = malloc((parts ? parts : 1) * sizeof(float));
    if (!first || !part) { free(first); free(part); return -1; }
    attn_multi mu = {c, n, first};
    first[0] = 0;
    size_t at = 0;
    for (int r = 0; r < n; r++) {
        c[r].part = part + at;
        at += attn_part_floats(&c[r]);
        first[r + 1] = first[r] + c[r].M * c[r].nch;
    }
    ab_pool_run(pool, multi_attn_task, &mu, first[n]);
    first[0] = 0;
    for (int r = 0; r < n; r++) first[r + 1] = first[r] + c[r].M * c[r].H;
    ab_pool_run(pool, multi_merge_task, &mu, first[n]);
    int failed = 0;
    for (int r = 0; r < n; r++) failed |= c[r].failed;
    free(first);
    free(part);
    return failed ? -1 : 0;
}

/* scale 0: 1/sqrt(hd); window 0: every earlier key; softcap 0: none. */
int ab_attention_ex(ab_pool *pool, int isa, const float *q, const float *k, const float *v, int M, int H, int Hkv,
                    int hd, int n_ctx, const int32_t *qpos, const uint8_t *mask, float scale, int window,
                    float softcap, float *out) {
    attn_ctx c;
    int rc = attn_setup(&c, ab_pool_threads(pool), isa, q, k, v, M, H, Hkv, hd, n_ctx, qpos, mask, scale, window,
                        softcap, out);
    if (rc) return rc;
    if (M == 0 || H == 0) return 0;
    return attn_run(pool, &c, 1);
}

/* Causal attention of several runs of query rows, run r on its own cache (ab_attn_run). */
int ab_attention_runs(ab_pool *pool, int isa, const ab_attn_run *runs, int n, int H, int Hkv, int hd, float scale,
                      int window, float softcap) {
    if (n < 0) return -3;
    attn_ctx *c = malloc((size_t)(n > 0 ? n : 1) * sizeof(attn_ctx));
    if (!c) return -1;
    int m = 0, rc = 0;
    for (int r = 0; r < n && !rc; r++) {
        const ab_attn_run *u = &runs[r];
        rc = attn_setup(&c[m], ab_pool_threads(pool), isa, u->q, u->k, u->v, u->M, H, Hkv, hd, u->n_ctx, u->qpos,
                        NULL, scale, window, softcap, u->out);
        if (!rc && u->M > 0 && H > 0) m++;
    }
    if (!rc && m > 0) rc = attn_run(pool, c, m);
    free(c);
    return rc;
}
