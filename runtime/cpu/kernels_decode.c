/* The whole Llama forward pass in one C call (docs/DESIGN.md "Backend interface"; SPEC.md section 8:
 * "keep a whole layer, or the whole step, in one C call over preallocated buffers").
 *
 * Per token the Python decoder makes about a dozen backend calls per layer; each pays cffi argument
 * conversion, NumPy allocations and a thread-pool wake-up, which together cost more than the kernels of
 * this small model. ab_forward runs the same sequence of the same C functions (so the logits are
 * bitwise those of engine/decoder.py on this backend): rmsnorm -> fused qkv product -> rope on q and k
 * -> k, v into the cache -> attention -> wo -> residual -> rmsnorm -> fused gate/up -> swiglu -> down ->
 * residual, for every layer, then the final norm and the output product. Linears run A16 (tables or
 * byte codes) or, with m->abits 1..8, quantize their input per token and group and run the byte-code
 * product of kernels_quant.c (the same ab_qd_run the per-op backend calls). A rotated linear (ab_lin.rotate,
 * loader/rotation.py) gets its input rotated first by ab_hadamard_rows, bitwise as the decoder's NumPy
 * rotation. Smoothed linears are not handled here; the engine falls back to per-op calls for those.
 */
#include <math.h>
#include <stdlib.h>
#include <string.h>
#include "ab_internal.h"

static int lin_ok(const ab_lin *l, int K, int N) {
    /* float16 group parameters are read by the byte-code kernels only (the table kernel takes float32) */
    return (l->wl || l->codes) && l->wsc && (!l->f16 || l->codes) && l->K == K && l->N == N && l->p >= 1 && l->p <= 8 && l->G > 0 && l->G % 32 == 0 &&
           l->Kp % l->G == 0 && l->K <= l->Kp;
}

static int qlin_ok(const ab_lin *l) {
    return l->codes && l->wpw && l->L > 0 && l->Ga > 0;
}

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

static int run_lin(ab_pool *pool, int isa, int abits, const ab_lin *l, const float *x, int M, float *y,
                   void *scratch, float *xr) {
    if (l->rotate) {            /* xr: M * K floats of the caller's buffer */
        memcpy(xr, x, (size_t)M * l->K * sizeof(float));
        int rc = ab_hadamard_rows(xr, M, l->K, l->rotate);
        if (rc) return rc;
        x = xr;
    }
    if (abits < 16)
        return ab_qd_run(pool, isa, l->codes, l->wpw, l->wsc, l->woff, l->f16, l->p, l->cw, l->N, l->Kp, l->G, abits,
                         l->Ga, l->L, x, NULL, M, l->K, y, NULL, NULL, NULL, scratch);
    if (l->codes)
        return ab_i8_run(pool, isa, l->codes, l->wsc, l->woff, l->f16, l->p, l->cw, l->N, l->Kp, l->G, x, M, l->K, y, scratch);
    return ab_a16_run(pool, isa, l->wl, l->wsc, l->woff, l->p, l->N, l->Kp, l->G, x, M, l->K, y, scratch);
}

int ab_forward(ab_pool *pool, int isa, const ab_model *m, float *x, int M, int pos0, float *kc, float *vc,
               int T, int all_logits, float *logits) {
    if (!(ab_isa_available() >> isa & 1) || isa < 0 || isa > AB_ISA_AVX512) return -2;
    int d = m->d, H = m->H, Hkv = m->Hkv, hd = m->hd, F = m->F;
    int ab = m->abits;
    if (!(ab == 16 || (ab >= 1 && ab <= 8))) return -3;
    if (M < 1 || pos0 < 0 || pos0 + M > T || Hkv < 1 || H % Hkv || hd < 2 || hd % 2 || hd > 1024) return -3;
    int qd = H * hd, kd = Hkv * hd, nqkv = qd + 2 * kd;
    int maxK = d > qd ? d : qd;
    maxK = maxK > F ? maxK : F;
    int maxKp = m->out.Kp;
    for (int i = 0; i < m->n_layers; i++) {
        const ab_layer *L = &m->layers[i];
        if (!lin_ok(&L->qkv, d, nqkv) || !lin_ok(&L->wo, qd, d) || !lin_ok(&L->gate_up, d, 2 * F) ||
            !lin_ok(&L->down, F, d))
            return -3;
        const ab_lin *ls[4] = {&L->qkv, &L->wo, &L->gate_up, &L->down};
        for (int j = 0; j < 4; j++) {
            maxKp = ls[j]->Kp > maxKp ? ls[j]->Kp : maxKp;
            if (ab < 16 && !qlin_ok(ls[j])) return -3;
        }
    }
    if (!lin_ok(&m->out, d, m->out.N) || (ab < 16 && !qlin_ok(&m->out))) return -3;

    size_t fl = (size_t)M * ((size_t)d * 2 + nqkv + (size_t)qd * 2 + (size_t)F * 3 + (size_t)maxK) + 64;
    size_t sc = ab_a16_scratch(M, maxKp), sc8 = ab_i8_scratch(M, maxKp);
    sc = sc > sc8 ? sc : sc8;
    size_t scq = ab_qd_scratch(M, maxKp);
    sc = sc > scq ? sc : scq;
    float *buf = NULL;
    if (posix_memalign((void **)&buf, 64, fl * sizeof(float) + sc + 64)) return -1;
    float *h = buf, *qkv = h + (size_t)M * d, *q = qkv + (size_t)M * nqkv, *att = q + (size_t)M * qd;
    float *tmp = att + (size_t)M * qd, *gu = tmp + (size_t)M * d, *act = gu + (size_t)M * 2 * F;
    float *xr = act + (size_t)M * F;                     /* rotated linear inputs (ab_lin.rotate) */
    void *scratch = (void *)(xr + (size_t)M * maxK + 16);
    int32_t *pos = malloc((size_t)M * sizeof(int32_t));
    double *rot = malloc((size_t)M * (hd / 2) * 2 * sizeof(double));
    if (!pos || !rot) { free(pos); free(rot); free(buf); return -1; }
    for (int i = 0; i < M; i++) pos[i] = pos0 + i;
    double *cs = rot, *sn = rot + (size_t)M * (hd / 2);
    ab_rope_table(pos, M, hd, m->theta, cs, sn);

    int rc = 0;
    size_t layer_kv = (size_t)T * kd;
    for (int li = 0; li < m->n_layers && !rc; li++) {
        const ab_layer *L = &m->layers[li];
        float *kl = kc + li * layer_kv, *vl = vc + li * layer_kv;
        ab_rmsnorm(pool, x, L->attn_norm, M, d, m->eps, h);
        if ((rc = run_lin(pool, isa, ab, &L->qkv, h, M, qkv, scratch, xr))) break;
        for (int i = 0; i < M; i++) {
            const float *row = qkv + (size_t)i * nqkv;
            memcpy(q + (size_t)i * qd, row, (size_t)qd * sizeof(float));
            memcpy(kl + (size_t)(pos0 + i) * kd, row + qd, (size_t)kd * sizeof(float));
            memcpy(vl + (size_t)(pos0 + i) * kd, row + qd + kd, (size_t)kd * sizeof(float));
        }
        ab_rope_apply(pool, q, M, H, hd, m->rope_style, cs, sn);
        ab_rope_apply(pool, kl + (size_t)pos0 * kd, M, Hkv, hd, m->rope_style, cs, sn);
        if ((rc = ab_attention(pool, isa, q, kl, vl, M, H, Hkv, hd, pos0 + M, pos, NULL, att))) break;
        if ((rc = run_lin(pool, isa, ab, &L->wo, att, M, tmp, scratch, xr))) break;
        ab_add(pool, x, tmp, (int64_t)M * d, x);
        ab_rmsnorm(pool, x, L->ffn_norm, M, d, m->eps, h);
        if ((rc = run_lin(pool, isa, ab, &L->gate_up, h, M, gu, scratch, xr))) break;
        for (int i = 0; i < M; i++)
            ab_swiglu(pool, isa, gu + (size_t)i * 2 * F, gu + (size_t)i * 2 * F + F, F, act + (size_t)i * F);
        if ((rc = run_lin(pool, isa, ab, &L->down, act, M, tmp, scratch, xr))) break;
        ab_add(pool, x, tmp, (int64_t)M * d, x);
    }
    if (!rc) {
        const float *xs = all_logits ? x : x + (size_t)(M - 1) * d;
        int Mo = all_logits ? M : 1;
        ab_rmsnorm(pool, xs, m->norm, Mo, d, m->eps, h);
        rc = run_lin(pool, isa, ab, &m->out, h, Mo, logits, scratch, xr);
    }
    free(rot);
    free(pos);
    free(buf);
    return rc;
}
