/* Declarations shared by the C files of the CPU backend (not seen by cffi). */
#ifndef AB_INTERNAL_H
#define AB_INTERNAL_H
#include <stdint.h>
#include <stddef.h>
#include "anybit_cpu.h"

#define AB_ISA_PORTABLE 0
#define AB_ISA_AVX2 1
#define AB_ISA_AVX512 2

/* Run fn(ctx, i) for i in [0, ntasks) on the pool's threads (the caller takes part); returns when all
 * tasks are done. Calls from several host threads are serialised. */
typedef void (*ab_task_fn)(void *ctx, int task);
void ab_pool_run(ab_pool *pool, ab_task_fn fn, void *ctx, int ntasks);

/* A16 product with caller-provided scratch (NULL: allocate); isa must already be checked. */
size_t ab_a16_scratch(int M, int Kp);
int ab_a16_run(ab_pool *pool, int isa, const uint8_t *wl, const float *wsc, const float *woff,
               int p, int N, int Kp, int G, const float *x, int M, int K, float *y, void *scratch);

size_t ab_i8_scratch(int M, int Kp);
int ab_i8_run(ab_pool *pool, int isa, const uint8_t *codes, const float *wsc, const float *woff,
              int p, int cw, int N, int Kp, int G, const float *x, int M, int K, float *y, void *scratch);

size_t ab_qd_scratch(int M, int Kp);
int ab_qd_run(ab_pool *pool, int isa, const uint8_t *codes, const int32_t *wpw, const float *wsc, const float *woff,
              int p, int cw, int N, int Kp, int G, int q, int Ga, int L, const float *x, const float *smooth,
              int M, int K, float *y, float *ascales, int64_t *dbg_I, int64_t *dbg_U, void *scratch);

#define AB_INLINE static inline __attribute__((always_inline))
#define AB_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl,avx512vpopcntdq,avx512vbmi,avx512vnni,popcnt")))
#define AB_AVX2 __attribute__((target("avx2,fma,popcnt")))
#endif
