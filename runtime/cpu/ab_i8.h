/* The context of the byte-code A16 product (kernels_int8.c), shared with its two-level tile loops
 * (kernels_kq.c). Not seen by cffi. */
#ifndef AB_I8_H
#define AB_I8_H
#include "ab_internal.h"

#define XQ 32639.0f

typedef struct {
    const uint8_t *codes;
    const void *wsc, *woff;      /* [Nt][ng][64] float32, or float16 a = 2s and z when f16 (ab_internal.h) */
    const float *x;
    int f16, p, cw, N, Kp, G, L, ng, nb, M, K, Nt, mbmax, isa, nr;
    int ar;                /* abits "q8": 0, or the block of llama.cpp's 8-bit grid (32: Q8_0, 256: Q8_K) */
    int16_t *x16;
    int8_t *xh, *xl;
    float *sx, *gs;
    int32_t *px;           /* (2^p - 1) * sum of x16 per block, wrapped to 32 bits */
    float *y;
    const ab_kq *kq;       /* two-level parameters and split codes (ab_internal.h), or NULL */
} i8_ctx;

/* Shared float epilogue of one block for 64 rows (the portable form; SIMD paths do the same per lane). */
AB_INLINE void i8_finish(const i8_ctx *c, int m, int b, const float *ws, const float *wo, const int32_t *D,
                         float *yacc) {
    int g = b * c->L / c->G;
    float l = c->sx[(size_t)m * c->nb + b];
    for (int i = 0; i < 64; i++) yacc[i] += (float)D[i] * (ws[i] * l);
    if (wo && ((b + 1) * c->L) % c->G == 0) {
        float s = c->gs[(size_t)m * c->ng + g];
        for (int i = 0; i < 64; i++) yacc[i] += wo[i] * s;
    }
}

/* abits "q8": one row rounded to llama.cpp's 8-bit grid into x16, xh, xl, sx, px, gs (kernels_q8.c). */
void ab_q8_quantize_row(const i8_ctx *c, int m);

/* Tiles of two-level weights whose codes come in several parts (kernels_kq.c). */
void ab_kq_tile_portable(const i8_ctx *c, int t, int m0, int mc);
void ab_kq_tile_avx2(const i8_ctx *c, int t, int m0, int mc);
void ab_kq_tile_avx512(const i8_ctx *c, int t, int m0, int mc);

#endif
