/* The packer's hot loops (loader/native.py builds this with cffi; loader/pack_ops.py calls it).
 *
 * Each function computes exactly what its NumPy reference in loader/ computes, operation for operation
 * in float64, so that a packed model does not depend on whether the compiler was there:
 *   abl_pack_codes   loader.bipolar.pack_planes         codes -> MSB-first bit planes
 *   abl_exact        loader.pack.exact_import + pack    raw GGUF Q4_0 / Q4_1 / Q8_0 blocks -> planes, s, o
 *   abl_dequant      gguf.quants.dequantize             raw Q4_0 / Q4_1 / Q8_0 blocks -> float64
 *   abl_hadamard     loader.rotation.hadamard_blocks    in-place block Walsh-Hadamard of float64 rows
 *   abl_quantize     loader.bipolar.quantize_weights    round to nearest with the clipping search
 * The clipping search compares squared errors summed over a group; NumPy sums a contiguous axis
 * pairwise (blocks of 8 partial sums, halves above 128 elements), and pairwise_sum below keeps that
 * order, so the chosen clipping ratio and hence every scale and code come out bitwise equal.
 * Built without -ffast-math and with -ffp-contract=off for the same reason.
 *
 * Rows are independent, so every function splits its rows over `threads` POSIX threads.
 */
#include <math.h>
#include <pthread.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#if defined(__SSE2__)
#include <emmintrin.h>
#endif

#include "pack_native.h"

/* ---- a parallel for over rows ------------------------------------------------------------------ */

typedef void (*range_fn)(void *ctx, int64_t lo, int64_t hi);
struct span { range_fn fn; void *ctx; int64_t lo, hi; };

static void *run_span(void *p) {
    struct span *s = p;
    s->fn(s->ctx, s->lo, s->hi);
    return NULL;
}

static int par_for(int threads, int64_t n, range_fn fn, void *ctx) {
    if (threads < 1) threads = 1;
    if (threads > 64) threads = 64;
    if (n < 2 * (int64_t)threads) threads = 1;
    if (threads == 1) { fn(ctx, 0, n); return 0; }
    pthread_t tid[64];
    struct span sp[64];
    int started = 0, rc = 0;
    for (int t = 0; t < threads; t++) {
        sp[t].fn = fn; sp[t].ctx = ctx;
        sp[t].lo = n * t / threads; sp[t].hi = n * (t + 1) / threads;
    }
    for (int t = 1; t < threads; t++) {
        if (pthread_create(&tid[t], NULL, run_span, &sp[t]) != 0) { rc = -1; break; }
        started = t;
    }
    run_span(&sp[0]);
    for (int t = 1; t <= started; t++) pthread_join(tid[t], NULL);
    if (rc) {                                /* a thread could not start: do its share here */
        for (int t = started + 1; t < threads; t++) run_span(&sp[t]);
    }
    return 0;
}

/* ---- bit planes -------------------------------------------------------------------------------- */

/* 32 codes -> `bits` plane words (MSB plane first), lane k = bit k; plane r goes to out[r * pstride]. */
static inline void pack32(const uint8_t *c, int bits, uint32_t *out, int64_t pstride) {
#if defined(__SSE2__)
    __m128i lo = _mm_loadu_si128((const __m128i *)c), hi = _mm_loadu_si128((const __m128i *)(c + 16));
    for (int r = 0; r < bits; r++) {
        int sh = 7 - (bits - 1 - r);         /* move bit (bits-1-r) of every byte to its top bit */
        uint32_t a = (uint32_t)_mm_movemask_epi8(_mm_slli_epi16(lo, sh));
        uint32_t b = (uint32_t)_mm_movemask_epi8(_mm_slli_epi16(hi, sh));
        out[r * pstride] = a | (b << 16);
    }
#else
    for (int r = 0; r < bits; r++) {
        int bit = bits - 1 - r;
        uint32_t w = 0;
        for (int k = 0; k < 32; k++) w |= (uint32_t)((c[k] >> bit) & 1u) << k;
        out[r * pstride] = w;
    }
#endif
}

struct pack_ctx { const uint8_t *codes; int64_t N, Kp; int bits; uint32_t *planes; };

static void pack_rows(void *p, int64_t lo, int64_t hi) {
    struct pack_ctx *c = p;
    int64_t W = c->Kp / 32;
    for (int64_t n = lo; n < hi; n++)
        for (int64_t w = 0; w < W; w++)
            pack32(c->codes + n * c->Kp + 32 * w, c->bits, c->planes + n * W + w, c->N * W);
}

int abl_pack_codes(const uint8_t *codes, int64_t N, int64_t Kp, int bits, uint32_t *planes, int threads) {
    if (bits < 1 || bits > 8 || Kp % 32) return -1;
    struct pack_ctx c = {codes, N, Kp, bits, planes};
    return par_for(threads, N, pack_rows, &c);
}

/* ---- GGUF blocks ------------------------------------------------------------------------------- */

static inline float f16_to_f32(uint16_t h) {
    uint32_t sign = (uint32_t)(h & 0x8000u) << 16, e = (h >> 10) & 0x1Fu, m = h & 0x3FFu, bits;
    if (e == 0x1F) {
        bits = sign | 0x7F800000u | (m << 13);                   /* inf, nan */
    } else if (e == 0) {
        if (m == 0) {
            bits = sign;
        } else {                                                  /* subnormal: normalise */
            int sh = 0;
            while (!(m & 0x400u)) { m <<= 1; sh++; }
            bits = sign | ((uint32_t)(113 - sh) << 23) | ((m & 0x3FFu) << 13);
        }
    } else {
        bits = sign | ((e + 112) << 23) | (m << 13);
    }
    float f;
    memcpy(&f, &bits, 4);
    return f;
}

static inline uint16_t rd16(const uint8_t *p) { return (uint16_t)(p[0] | (p[1] << 8)); }

static int block_bytes(int type) { return type == ABL_Q4_0 ? 18 : type == ABL_Q4_1 ? 20 : type == ABL_Q8_0 ? 34 : 0; }

/* the 32 source codes of one block (Q4_x: 0..15, element j low nibble of byte j, j+16 its high nibble;
 * Q8_0: the int8 value + 128), plus d and m */
static inline void block_codes(const uint8_t *b, int type, uint8_t *q, float *d, float *m) {
    *d = f16_to_f32(rd16(b));
    *m = 0.0f;
    const uint8_t *qs = b + 2;
    if (type == ABL_Q4_1) { *m = f16_to_f32(rd16(b + 2)); qs = b + 4; }
    if (type == ABL_Q8_0) {
        for (int j = 0; j < 32; j++) q[j] = (uint8_t)((int)(int8_t)qs[j] + 128);
    } else {
        for (int j = 0; j < 16; j++) { q[j] = qs[j] & 0x0F; q[j + 16] = qs[j] >> 4; }
    }
}

struct exact_ctx { const uint8_t *raw; int type; int64_t N, K; int bits; uint32_t *planes; float *s, *o; };

static void exact_rows(void *p, int64_t lo, int64_t hi) {
    struct exact_ctx *c = p;
    int bs = block_bytes(c->type), src_bits = c->type == ABL_Q8_0 ? 8 : 4;
    int shift = ((1 << c->bits) - (1 << src_bits)) / 2;        /* a narrower grid sits inside a wider one */
    int64_t nb = c->K / 32, W = nb;
    uint8_t q[32];
    for (int64_t n = lo; n < hi; n++) {
        const uint8_t *row = c->raw + n * nb * bs;
        for (int64_t b = 0; b < nb; b++) {
            float d, m;
            block_codes(row + b * bs, c->type, q, &d, &m);
            if (shift) for (int j = 0; j < 32; j++) q[j] = (uint8_t)(q[j] + shift);
            pack32(q, c->bits, c->planes + n * W + b, c->N * W);
            c->s[n * nb + b] = (float)((double)d / 2);
            c->o[n * nb + b] = (float)(c->type == ABL_Q4_1 ? 7.5 * (double)d + (double)m : -0.5 * (double)d);
        }
    }
}

int abl_exact(const uint8_t *raw, int type, int64_t N, int64_t K, int bits, uint32_t *planes, float *scales,
              float *offsets, int threads) {
    int src_bits = type == ABL_Q8_0 ? 8 : 4;
    if (!block_bytes(type) || K % 32 || bits < src_bits || bits > 8) return -1;
    struct exact_ctx c = {raw, type, N, K, bits, planes, scales, offsets};
    return par_for(threads, N, exact_rows, &c);
}

struct deq_ctx { const uint8_t *raw; int type; int64_t K; double *out; };

static void deq_rows(void *p, int64_t lo, int64_t hi) {
    struct deq_ctx *c = p;
    int bs = block_bytes(c->type);
    int64_t nb = c->K / 32;
    uint8_t q[32];
    for (int64_t n = lo; n < hi; n++) {
        for (int64_t b = 0; b < nb; b++) {
            float d, m;
            block_codes(c->raw + (n * nb + b) * bs, c->type, q, &d, &m);
            double *o = c->out + n * c->K + 32 * b;
            /* float32 arithmetic as gguf.quants does it: d*(q-8), d*q + m, q*d */
            if (c->type == ABL_Q4_0) for (int j = 0; j < 32; j++) o[j] = (double)(d * (float)((int)q[j] - 8));
            else if (c->type == ABL_Q4_1) for (int j = 0; j < 32; j++) o[j] = (double)(d * (float)q[j] + m);
            else for (int j = 0; j < 32; j++) o[j] = (double)((float)((int)q[j] - 128) * d);
        }
    }
}

int abl_dequant(const uint8_t *raw, int type, int64_t N, int64_t K, double *out, int threads) {
    if (!block_bytes(type) || K % 32) return -1;
    struct deq_ctx c = {raw, type, K, out};
    return par_for(threads, N, deq_rows, &c);
}

/* ---- rotation ---------------------------------------------------------------------------------- */

struct had_ctx { double *x; int64_t K; int b; };

static void had_rows(void *p, int64_t lo, int64_t hi) {
    struct had_ctx *c = p;
    double scale = 1.0 / sqrt((double)c->b);
    for (int64_t n = lo; n < hi; n++) {
        double *row = c->x + n * c->K;
        for (int64_t blk = 0; blk < c->K; blk += c->b) {
            double *y = row + blk;
            for (int h = 1; h < c->b; h *= 2)
                for (int j = 0; j < c->b; j += 2 * h)
                    for (int k = j; k < j + h; k++) {
                        double a = y[k], e = y[k + h];
                        y[k] = a + e;
                        y[k + h] = a - e;
                    }
            for (int k = 0; k < c->b; k++) y[k] *= scale;
        }
    }
}

int abl_hadamard(double *x, int64_t rows, int64_t K, int b, int threads) {
    if (b < 2 || (b & (b - 1)) || K % b) return -1;
    struct had_ctx c = {x, K, b};
    return par_for(threads, rows, had_rows, &c);
}

/* ---- round to nearest with the clipping search ------------------------------------------------- */

/* NumPy's summation order for a contiguous float64 axis of n elements: blocks of up to 128 summed with
 * 8 partial sums, longer axes split in halves (multiples of 8) */
static inline __attribute__((always_inline)) double pairwise_block(const double *a, int64_t n) {
    if (n < 8) {
        double r = -0.0;
        for (int64_t i = 0; i < n; i++) r += a[i];
        return r;
    }
    double r[8];
    int64_t i;
    for (int j = 0; j < 8; j++) r[j] = a[j];
    for (i = 8; i < n - (n % 8); i += 8)
        for (int j = 0; j < 8; j++) r[j] += a[i + j];
    double res = ((r[0] + r[1]) + (r[2] + r[3])) + ((r[4] + r[5]) + (r[6] + r[7]));
    for (; i < n; i++) res += a[i];
    return res;
}

static double pairwise_sum(const double *a, int64_t n) {
    if (n <= 128) return pairwise_block(a, n);
    int64_t n2 = n / 2;
    n2 -= n2 % 8;
    return pairwise_sum(a, n2) + pairwise_sum(a + n2, n - n2);
}

struct quant_ctx {
    const double *w; int64_t K, Kp, Ntot, row0; int bits, group, asym, nr;
    const double *ratios; uint32_t *planes; float *s, *o;
    double *sqerr;                  /* per row: squared error of the stored weight, squared norm of x */
    volatile int failed;
};

/* The squared errors of one group's lanes under scale s and offset o (safe: s, or 1 where s = 0), as
 * NumPy computes them: code c = clip(rint(((x - o) / safe + top) / 2), 0, top), error s*(2c - top) + o - x.
 * Division is most of the cost, so the codes are first found with the reciprocal. x * (1/safe) is within
 * 2 ulps of x / safe, and |(x - o) / safe| stays near top, so the two halves h differ by under 1e-12:
 * rint gives the same code unless h lies within 1e-6 of a half-integer. Only then (rarely: ~1e-6 of the
 * lanes of random weights) are the group's codes computed again by division, so every code, error and
 * choice of clipping ratio is still NumPy's bit for bit. rint is one rounding instruction from SSE4.1
 * on, hence the per-ISA copies of quant_rows below (every copy performs the same IEEE operations). */
static inline __attribute__((always_inline)) void group_errors(const double *xg, int64_t nv, double s, double o,
                                                               double safe, int top, double *e, double *cs) {
    const double t = (double)top, inv = 1.0 / safe;
    if (inv < 1e300) {                           /* a finite reciprocal (safe is no subnormal) */
        int64_t near = 0;
        for (int64_t j = 0; j < nv; j++) {
            double h = ((xg[j] - o) * inv + t) * 0.5;
            double c = rint(h);
            near += fabs(h - c) > 0.5 - 1e-6;     /* rint leaves |h - c| <= 1/2: a tie is near 1/2 */
            c = c > 0 ? c : 0.0;
            c = c < t ? c : t;
            double d = s * (2.0 * c - t) + o - xg[j];
            e[j] = d * d;
            if (cs) cs[j] = c;
        }
        if (!near) return;
    }
    for (int64_t j = 0; j < nv; j++) {
        double c = rint(((xg[j] - o) / safe + t) / 2.0);
        c = c > 0 ? c : 0.0;
        c = c < t ? c : t;
        double d = s * (2.0 * c - t) + o - xg[j];
        e[j] = d * d;
        if (cs) cs[j] = c;
    }
}

static inline __attribute__((always_inline)) void quant_rows_body(struct quant_ctx *c, int64_t lo, int64_t hi) {
    int top = (1 << c->bits) - 1, G = c->group;
    int64_t ng = c->Kp / G, W = c->Kp / 32;
    double *e = malloc(sizeof(double) * (size_t)G * 2);
    uint8_t *codes = malloc((size_t)c->Kp);
    if (!e || !codes) { free(e); free(codes); c->failed = 1; return; }
    double *cs = e + G;
    for (int64_t n = lo; n < hi; n++) {
        const double *x = c->w + n * c->K;
        double row_err = 0.0, row_ref = 0.0;
        for (int64_t g = 0; g < ng; g++) {
            int64_t base = g * G, nv = c->K - base < G ? c->K - base : G;
            const double *xg = x + base;
            /* four running extremes: independent chains (NaN weights: the readers refuse them) */
            double mx[4] = {-INFINITY, -INFINITY, -INFINITY, -INFINITY}, mn[4] = {INFINITY, INFINITY, INFINITY, INFINITY};
            int64_t j = 0;
            for (; j + 4 <= nv; j += 4)
                for (int u = 0; u < 4; u++) {
                    mx[u] = xg[j + u] > mx[u] ? xg[j + u] : mx[u];
                    mn[u] = xg[j + u] < mn[u] ? xg[j + u] : mn[u];
                }
            for (; j < nv; j++) {
                mx[0] = xg[j] > mx[0] ? xg[j] : mx[0];
                mn[0] = xg[j] < mn[0] ? xg[j] : mn[0];
            }
            double gmax = mx[0], gmin = mn[0];
            for (int u = 1; u < 4; u++) {
                gmax = mx[u] > gmax ? mx[u] : gmax;
                gmin = mn[u] < gmin ? mn[u] : gmin;
            }
            for (j = nv; j < G; j++) e[j] = 0.0;
            double best = INFINITY, bs = 1.0, bo = 0.0;
            for (int r = 0; r < c->nr; r++) {
                double ratio = c->ratios[r], s, o;
                if (c->asym) {
                    double lo_ = gmin * ratio, hi_ = gmax * ratio;
                    s = (hi_ - lo_) / (double)(2 * top);
                    o = (hi_ + lo_) / 2;
                } else {
                    double a = fabs(gmin), b = fabs(gmax);
                    s = (a >= b ? a : b) * ratio / (double)top;
                    o = 0.0;
                }
                if (!(s > 0)) s = 0.0;
                group_errors(xg, nv, s, o, s > 0 ? s : 1.0, top, e, NULL);
                double err = 0.0 + (G <= 128 ? pairwise_block(e, G) : pairwise_sum(e, G));
                if (err < best) { best = err; bs = s; bo = o; }
            }
            /* the codes under the chosen parameters; the error (for the report) at their float32 values */
            float s32 = (float)bs, o32 = c->asym ? (float)bo : 0.0f;
            group_errors(xg, nv, bs, bo, bs > 0 ? bs : 1.0, top, e, cs);
            double gs = (double)s32, go = (double)o32, ge = 0.0, gr = 0.0;
            for (j = 0; j < nv; j++) {
                codes[base + j] = (uint8_t)cs[j];
                double d = gs * (2.0 * cs[j] - top) + go - xg[j];
                ge += d * d;
                gr += xg[j] * xg[j];
            }
            for (j = nv; j < G; j++) codes[base + j] = 0;
            row_err += ge;
            row_ref += gr;
            c->s[n * ng + g] = s32;
            if (c->asym) c->o[n * ng + g] = o32;
        }
        int64_t gn = c->row0 + n;
        for (int64_t w = 0; w < W; w++) pack32(codes + 32 * w, c->bits, c->planes + gn * W + w, c->Ntot * W);
        c->sqerr[2 * n] = row_err;
        c->sqerr[2 * n + 1] = row_ref;
    }
    free(e);
    free(codes);
}

static void quant_rows(void *p, int64_t lo, int64_t hi) { quant_rows_body(p, lo, hi); }
#if defined(__x86_64__) && defined(__GNUC__)
__attribute__((target("avx2"))) static void quant_rows_avx2(void *p, int64_t lo, int64_t hi) {
    quant_rows_body(p, lo, hi);
}
__attribute__((target("avx512f,avx512dq,avx512vl"))) static void quant_rows_avx512(void *p, int64_t lo, int64_t hi) {
    quant_rows_body(p, lo, hi);
}
#endif

static range_fn quant_kernel(void) {
#if defined(__x86_64__) && defined(__GNUC__)
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512vl"))
        return quant_rows_avx512;
    if (__builtin_cpu_supports("avx2")) return quant_rows_avx2;
#endif
    return quant_rows;
}

int abl_quantize(const double *w, int64_t N, int64_t K, int bits, int group, int asym, const double *ratios,
                 int nratios, uint32_t *planes, int64_t Ntot, int64_t row0, float *scales, float *offsets,
                 double *sqerr, int threads) {
    if (bits < 1 || bits > 8 || group <= 0 || group % 32 || nratios < 1 || row0 + N > Ntot) return -1;
    int64_t Kp = (K + group - 1) / group * group;
    struct quant_ctx c = {w, K, Kp, Ntot, row0, bits, group, asym, nratios, ratios, planes, scales, offsets,
                          sqerr, 0};
    par_for(threads, N, quant_kernel(), &c);
    return c.failed ? -2 : 0;                                 /* -2: a worker could not allocate */
}
