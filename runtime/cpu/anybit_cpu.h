/* anybit CPU backend: the C entry points called through cffi (runtime/cpu/build.py feeds this file to
 * ffi.cdef, so it holds plain declarations only: no macros, no attributes, no includes).
 *
 * Layouts (docs/DESIGN.md): canonical planes uint32 (p, N, Kp/32), MSB plane first, lane k = bit k%32 of
 * word k/32. The A16 table-lookup kernels read a preprocessed copy (runtime/cpu/layout.py):
 * wl uint8 [Nt][p][Kp/8][64] (Nt = ceil(N/64) tiles of 64 rows, one byte = 8 lanes of one row, byte
 * position -> row permuted so that the byte shuffles produce rows in natural order), and scales /
 * offsets float32 [Nt][Kp/G][64]. isa: 0 portable, 1 avx2, 2 avx512. Functions returning int give 0 on
 * success, -1 on allocation failure, -2 on an unavailable isa, -3 on bad arguments.
 */
typedef struct ab_pool ab_pool;

ab_pool *ab_pool_create(int nthreads);
void ab_pool_destroy(ab_pool *pool);
int ab_pool_threads(ab_pool *pool);
int ab_pool_check(ab_pool *pool, int calls, int max_tasks, unsigned seed);   /* tests: 0 = every task once */
int ab_isa_available(void);
int ab_a16_block(int G);

int ab_linear_a16(ab_pool *pool, int isa, const uint8_t *wl, const float *wsc, const float *woff,
                  int p, int N, int Kp, int G, const float *x, int M, int K, float *y);
int ab_linear_a16_f32(ab_pool *pool, const uint32_t *planes, const float *scales, const float *offsets,
                      int p, int N, int Kp, int G, const float *x, int M, int K, float *y);
int ab_build_lut(const float *x, int K, int Kp, int G, int8_t *lut, float *lscale, float *gsum);

/* A16 by integer dot products (kernels_int8.c; backend.py I8_MIN_BITS says from which p it replaces the
 * tables): codes packed cw = 2, 4 or 8 bits each in tiles uint8 [Nt][Q][64][4] (runtime/cpu/layout.py
 * codes_tiles), same tiled scales/offsets (f16 = 0: float32 s, o; f16 = r in 1..255: float16 a = 2s and
 * z = o - r*s, see ab_internal.h); x quantized to 16 bits per table block. */
int ab_linear_i8(ab_pool *pool, int isa, const uint8_t *codes, const void *wsc, const void *woff, int f16,
                 int p, int cw, int N, int Kp, int G, const float *x, int M, int K, float *y);
int ab_i8_quantize(int isa, const float *x, int K, int Kp, int G, int16_t *x16, float *sx, float *gs);
/* abits "q8" (runtime/act_q8.py): x rounded to llama.cpp's 8-bit grid in blocks of ar lanes first (32: the
 * Q8_0 rule, 256: the Q8_K rule; 0: none), then the exact byte-code product. ab_i8_block: the kernel's
 * block of lanes for weight group G and rounding block ar (-3: no such pair). ab_i8_quantize_q8: one
 * row's x16 (= the 8-bit codes q), block scales (= the grid's d, >= 0) and group sums (of d * q). */
int ab_linear_i8_q8(ab_pool *pool, int isa, const uint8_t *codes, const void *wsc, const void *woff, int f16,
                    int p, int cw, int N, int Kp, int G, const float *x, int M, int K, int ar, float *y);
int ab_i8_block(int G, int ar);
int ab_i8_quantize_q8(int isa, const float *x, int K, int Kp, int G, int ar, int16_t *x16, float *sx, float *gs);

void ab_code_sums(const uint32_t *planes, int p, int rows, int W, uint16_t *out);
int ab_quantize_acts(ab_pool *pool, const float *x, int M, int K, int Kp, int q, int Ga,
                     const float *smooth, uint32_t *aplanes, float *ascales, uint16_t *acsum);
int ab_linear_quant(ab_pool *pool, int isa, const uint32_t *planes, const uint16_t *wcsum,
                    const float *scales, const float *offsets, int p, int N, int Kp, int G,
                    const uint32_t *aplanes, const uint16_t *acsum, const float *ascales, int q, int Ga,
                    int L, int M, int K, float *y, int64_t *dbg_I, int64_t *dbg_U);

/* Quantized activations by byte dot products (kernels_quant.c): weight codes in the codes_tiles layout
 * (cw = container bits), wpw int32 [Nt][Kp/32][64] = 2 * code sum per word (ab_qd_word_sums); x is
 * quantized here (q bits, groups of Ga lanes, optional smooth divisor); blocks of L = min(G, Ga) lanes;
 * wsc / woff / f16 as in ab_linear_i8.
 * dbg_I / dbg_U (M, N, Kp/L), or NULL: the exact block integers (computed on the portable path). */
void ab_qd_word_sums(const uint32_t *planes, int p, int N, int W, int32_t *out);
int ab_linear_qd(ab_pool *pool, int isa, const uint8_t *codes, const int32_t *wpw, const void *wsc,
                 const void *woff, int f16, int p, int cw, int N, int Kp, int G, int q, int Ga, int L, const float *x,
                 const float *smooth, int M, int K, float *y, int64_t *dbg_I, int64_t *dbg_U);

void ab_rmsnorm(ab_pool *pool, const float *x, const float *w, int M, int d, float eps, float *out);
void ab_layernorm(ab_pool *pool, const float *x, const float *w, const float *b, int M, int d, float eps,
                  float *out);
int ab_rope(ab_pool *pool, float *x, const int32_t *pos, int M, int H, int hd, float theta, int style);
int ab_attention(ab_pool *pool, int isa, const float *q, const float *k, const float *v, int M, int H, int Hkv,
                 int hd, int n_ctx, const int32_t *qpos, const uint8_t *mask, float *out);
int ab_swiglu(ab_pool *pool, int isa, const float *g, const float *u, int64_t n, float *out);
int ab_geglu_tanh(ab_pool *pool, int isa, const float *g, const float *u, int64_t n, float *out);
void ab_gelu(ab_pool *pool, const float *x, int64_t n, float *out);
void ab_add(ab_pool *pool, const float *a, const float *b, int64_t n, float *out);
int64_t ab_argmax(const float *x, int64_t n);

int ab_attention_ex(ab_pool *pool, int isa, const float *q, const float *k, const float *v, int M, int H, int Hkv,
                    int hd, int n_ctx, const int32_t *qpos, const uint8_t *mask, float scale, int window,
                    float softcap, float *out);

/* x R in place for M rows of K floats: blocks of b lanes (a power of two dividing K) times H_b / sqrt(b),
 * by the butterfly of loader/rotation.py in the same order, so the results are bitwise NumPy's. */
int ab_hadamard_rows(float *x, int M, int K, int b);

/* The graph executor (kernels_graph.c; runtime/cpu/program.py compiles engine/graph.py graphs into these).
 * A prepared linear: weights in the A16 table layout or byte-code tiles. */
typedef struct {
    const uint8_t *wl;          /* table-kernel planes, or NULL when codes is set */
    const uint8_t *codes;       /* byte-code tiles (kernels_int8.c), or NULL */
    const void *wsc;            /* float32 s, o; or (f16 = r > 0, byte-code kernels only) float16 a = 2s, z = o - r*s */
    const void *woff;
    int f16;
    int p, N, Kp, G, K;
    int cw;                     /* bits per code container in codes: 2, 4 or 8 */
    const int32_t *wpw;         /* quantized activations: word code sums (ab_qd_word_sums), else NULL */
    int Ga, L;                  /* quantized activations: activation group and block lanes */
    int rotate;                 /* > 0: the weight is W R; the input is rotated first (ab_hadamard_rows) */
    const float *smooth;        /* (K,) divisor of the input, or NULL */
    int ar;                     /* abits "q8": the input's 8-bit rounding block (32 or 256; byte codes only), else 0 */
} ab_lin;

enum {
    AB_G_RMSNORM = 1, AB_G_LAYERNORM = 2, AB_G_LINEAR = 3, AB_G_ROPE = 4, AB_G_KV_STORE = 5, AB_G_ATTENTION = 6,
    AB_G_ACT_MUL = 7, AB_G_GELU = 8, AB_G_ADD = 9, AB_G_SCALE = 10, AB_G_SOFTCAP = 11, AB_G_TAKE_ROWS = 12
};

typedef struct {
    float *base;                /* row 0, column 0 */
    int ld;                     /* floats per row */
} ab_gbuf;

/* One op: out/a/b are buffer indices (-1: none) with a first column each; n the output columns; rows 0:
 * the step's token rows, 1: its output rows. i0..i5, f0, f1, w, w2 as kernels_graph.c's run_op says. */
typedef struct {
    int kind, rows, n;
    int out, out_col, a, a_col, b, b_col;
    int i0, i1, i2, i3, i4, i5;
    float f0, f1;
    const float *w, *w2;
    const ab_lin *lin;
} ab_gop;

typedef struct {
    const ab_gop *ops;
    int n_ops;
    const ab_gbuf *bufs;
    int abits;                  /* 16: A16; 1..8: activations quantized per token and group (ab_lin Ga) */
    int cap_rows, cap_out;      /* rows the buffers, scratch and tables hold */
    void *scratch;              /* ab_lin_scratch(cap_rows, largest Kp) bytes */
    float *xr;                  /* cap_rows * largest K floats */
    double *rope;               /* RoPE tables, rope_stride doubles each */
    size_t rope_stride;
} ab_graph;

/* A step: M token rows at positions pos, row i's KV cache (planes, T, kv_heads, head_dim) at kc[i] /
 * vc[i]; out_rows: the R rows take_rows gathers. */
typedef struct {
    int M, R, T, kv_heads, head_dim;
    const int32_t *pos;
    const int32_t *out_rows;
    float **kc, **vc;
} ab_gstep;

size_t ab_lin_scratch(int M, int Kp);
int ab_graph_run(ab_pool *pool, int isa, const ab_graph *g, const ab_gstep *s, int op0, int op1);
