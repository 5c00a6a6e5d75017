/* The graph executor: one loop over compiled op records (runtime/cpu/program.py compiles an
 * engine/graph.py graph into ab_gop records over a buffer table; docs/DESIGN.md "The graph").
 *
 * Why one C call per step: the per-op backend makes one call per op and token, each paying
 * cffi argument conversion, NumPy allocations and a thread-pool wake-up, which together cost more than
 * the kernels of a small model. Here the step's buffers, kernel scratch and RoPE tables are allocated
 * once by the program (grown when a step has more rows), the pool is the backend's, and each op calls
 * the same kernel function as the per-op backend with the same arguments, so the results are bitwise
 * those of the op-by-op interpreter on this backend. Nothing here knows a model: ops name buffers.
 */
#include <math.h>
#include <stdlib.h>
#include <string.h>
#include "ab_internal.h"

int ab_hadamard_rows(float *x, int M, int K, int b) {
    if (b < 2 || (b & (b - 1)) || K % b || M < 0) return -3;
    float sc = (float)(1.0 / sqrt((double)b));
    for (size_t r = 0; r < (size_t)M * (K / b); r++) {
        float *v = x + r * b;
        for (int h = 1; h < b; h *= 2)
            for (int i = 0; i < b; i += 2 * h)
                for (int j = i; j < i + h; j++) {
                    float a = v[j], c = v[j + h];
                    v[j] = a + c;
                    v[j + h] = a - c;
                }
        for (int i = 0; i < b; i++) v[i] *= sc;
    }
    return 0;
}

size_t ab_lin_scratch(int M, int Kp) {
    size_t a = ab_a16_scratch(M, Kp), b = ab_i8_scratch(M, Kp), c = ab_qd_scratch(M, Kp);
    a = a > b ? a : b;
    return a > c ? a : c;
}

/* x (M rows, row stride ldx) W^T -> y (M, N). The input goes through xr (M * K floats) when it must be
 * rotated (ab_lin.rotate: the weight is W R), divided by a smoothing vector (A16; the quantizer divides
 * by itself) or gathered from a strided view. */
static int run_lin(ab_pool *pool, int isa, int abits, const ab_lin *l, const float *x, int ldx, int M, float *y,
                   void *scratch, float *xr) {
    int K = l->K;
    int a16_smooth = l->smooth && abits == 16;
    if (l->rotate || a16_smooth || ldx != K) {
        for (int i = 0; i < M; i++) memcpy(xr + (size_t)i * K, x + (size_t)i * ldx, (size_t)K * sizeof(float));
        if (l->rotate) {
            int rc = ab_hadamard_rows(xr, M, K, l->rotate);
            if (rc) return rc;
        }
        if (a16_smooth)
            for (size_t i = 0; i < (size_t)M * K; i++) xr[i] = xr[i] / l->smooth[i % K];
        x = xr;
    }
    if (abits < 16)
        return ab_qd_run(pool, isa, l->codes, l->wpw, l->wsc, l->woff, l->f16, l->p, l->cw, l->N, l->Kp, l->G, abits,
                         l->Ga, l->L, x, l->smooth, M, K, y, NULL, NULL, NULL, scratch);
    if (l->codes)
        return ab_i8_run(pool, isa, l->codes, l->wsc, l->woff, l->f16, l->p, l->cw, l->N, l->Kp, l->G, x, M, K, l->ar, y,
                         scratch);
    if (l->ar) return -3;       /* the q8 rounding lives in the byte-code kernel's quantizer */
    return ab_a16_run(pool, isa, l->wl, l->wsc, l->woff, l->p, l->N, l->Kp, l->G, x, M, K, y, scratch);
}

static float *at(const ab_graph *g, int buf, int col, int row) {
    return g->bufs[buf].base + (size_t)row * g->bufs[buf].ld + col;
}

static int whole(const ab_graph *g, int buf, int col, int n) {
    return col == 0 && g->bufs[buf].ld == n;
}

static int run_op(ab_pool *pool, int isa, const ab_graph *g, const ab_gop *o, const ab_gstep *s) {
    int M = o->rows ? s->R : s->M, n = o->n;
    float *out = at(g, o->out, o->out_col, 0);
    const float *a = o->a >= 0 ? at(g, o->a, o->a_col, 0) : NULL;
    const float *b = o->b >= 0 ? at(g, o->b, o->b_col, 0) : NULL;
    int ldo = g->bufs[o->out].ld, lda = o->a >= 0 ? g->bufs[o->a].ld : 0, ldb = o->b >= 0 ? g->bufs[o->b].ld : 0;
    switch (o->kind) {
    case AB_G_RMSNORM:          /* i0: group (0: the row) */
        if (o->i0) ab_rmsnorm(pool, a, o->w, M * (n / o->i0), o->i0, o->f0, out);
        else ab_rmsnorm(pool, a, o->w, M, n, o->f0, out);
        return 0;
    case AB_G_LAYERNORM:
        ab_layernorm(pool, a, o->w, o->w2, M, n, o->f0, out);
        return 0;
    case AB_G_LINEAR: {
        int rc = run_lin(pool, isa, g->abits, o->lin, a, lda, M, out, g->scratch, g->xr);
        if (rc || !o->w) return rc;
        for (int i = 0; i < M; i++)
            for (int j = 0; j < n; j++) out[(size_t)i * ldo + j] += o->w[j];
        return 0;
    }
    case AB_G_ROPE: {           /* i0 heads, i1 head dim, i2 n_rot, i3 style, i4 table; w freq factors */
        const double *cs = g->rope + (size_t)o->i4 * g->rope_stride;
        const double *sn = cs + (size_t)s->M * (o->i2 / 2);
        for (int i = 0; i < M; i++) memcpy(out + (size_t)i * ldo, a + (size_t)i * lda, (size_t)n * sizeof(float));
        ab_rope_apply_partial(pool, out, M, o->i0, o->i1, o->i2, o->i3, cs, sn);
        return 0;
    }
    case AB_G_KV_STORE: {       /* i0 cache plane; a = k, b = v, each kv_heads * head_dim wide */
        size_t kd = (size_t)s->kv_heads * s->head_dim, plane = (size_t)o->i0 * s->T * kd;
        for (int i = 0; i < M; i++) {
            memcpy(s->kc[i] + plane + (size_t)s->pos[i] * kd, a + (size_t)i * lda, kd * sizeof(float));
            memcpy(s->vc[i] + plane + (size_t)s->pos[i] * kd, b + (size_t)i * ldb, kd * sizeof(float));
        }
        return 0;
    }
    case AB_G_ATTENTION: {      /* i0 cache plane, i1 heads, i2 kv heads, i3 window; f0 scale (0: 1/sqrt(hd)), f1 softcap */
        int hd = s->head_dim, n = 0;
        size_t plane = (size_t)o->i0 * s->T * (size_t)o->i2 * hd;
        ab_attn_run *runs = malloc((size_t)M * sizeof(ab_attn_run));
        if (!runs) return -1;
        for (int r0 = 0; r0 < M;) {      /* a run of rows on one cache: one call's worth */
            int r1 = r0 + 1, last = s->pos[r0];
            while (r1 < M && s->kc[r1] == s->kc[r0]) { last = s->pos[r1] > last ? s->pos[r1] : last; r1++; }
            ab_attn_run u = {a + (size_t)r0 * lda, s->kc[r0] + plane, s->vc[r0] + plane, s->pos + r0,
                             out + (size_t)r0 * ldo, r1 - r0, last + 1};
            runs[n++] = u;
            r0 = r1;
        }
        int rc = ab_attention_runs(pool, isa, runs, n, o->i1, o->i2, hd, o->f0, o->i3, o->f1);
        free(runs);
        return rc;
    }
    case AB_G_ACT_MUL:          /* i0: 0 silu, 1 gelu_tanh; per row, as the rows may be column views */
        for (int i = 0; i < M; i++) {
            const float *ar = a + (size_t)i * lda, *br = b + (size_t)i * ldb;
            float *orow = out + (size_t)i * ldo;
            int rc = o->i0 == 0 ? ab_swiglu(pool, isa, ar, br, n, orow) : ab_geglu_tanh(pool, isa, ar, br, n, orow);
            if (rc) return rc;
        }
        return 0;
    case AB_G_GELU:
        if (whole(g, o->out, o->out_col, n) && whole(g, o->a, o->a_col, n))
            ab_gelu(pool, a, (int64_t)M * n, out);
        else
            for (int i = 0; i < M; i++) ab_gelu(pool, a + (size_t)i * lda, n, out + (size_t)i * ldo);
        return 0;
    case AB_G_ADD:
        if (whole(g, o->out, o->out_col, n) && whole(g, o->a, o->a_col, n) && whole(g, o->b, o->b_col, n))
            ab_add(pool, a, b, (int64_t)M * n, out);
        else
            for (int i = 0; i < M; i++) ab_add(pool, a + (size_t)i * lda, b + (size_t)i * ldb, n, out + (size_t)i * ldo);
        return 0;
    case AB_G_SCALE:
        for (int i = 0; i < M; i++)
            for (int j = 0; j < n; j++) out[(size_t)i * ldo + j] = a[(size_t)i * lda + j] * o->f0;
        return 0;
    case AB_G_SOFTCAP:
        for (int i = 0; i < M; i++)
            for (int j = 0; j < n; j++) out[(size_t)i * ldo + j] = o->f0 * tanhf(a[(size_t)i * lda + j] / o->f0);
        return 0;
    case AB_G_TAKE_ROWS:
        for (int i = 0; i < s->R; i++)
            memcpy(out + (size_t)i * ldo, a + (size_t)s->out_rows[i] * lda, (size_t)n * sizeof(float));
        return 0;
    default:
        return -3;
    }
}

int ab_graph_run(ab_pool *pool, int isa, const ab_graph *g, const ab_gstep *s, int op0, int op1) {
    if (!(ab_isa_available() >> isa & 1) || isa < 0 || isa > AB_ISA_AVX512) return -2;
    if (s->M < 1 || s->R < 0 || op0 < 0 || op1 > g->n_ops || s->M > g->cap_rows || s->R > g->cap_out) return -3;
    for (int i = 0; i < s->M; i++)
        if (s->pos[i] < 0 || s->pos[i] >= s->T) return -3;
    for (int i = 0; i < s->R; i++)
        if (s->out_rows[i] < 0 || s->out_rows[i] >= s->M) return -3;
    if (op0 == 0)               /* the step's RoPE tables, shared by every rope op that names them */
        for (int i = 0; i < g->n_ops; i++) {
            const ab_gop *o = &g->ops[i];
            if (o->kind == AB_G_ROPE && o->i5) {        /* i5: first op of its table */
                double *cs = g->rope + (size_t)o->i4 * g->rope_stride;
                ab_rope_table(s->pos, s->M, o->i2, o->f0, o->w, cs, cs + (size_t)s->M * (o->i2 / 2));
            }
        }
    for (int i = op0; i < op1; i++) {
        int rc = run_op(pool, isa, g, &g->ops[i], s);
        if (rc) return rc;
    }
    return 0;
}
