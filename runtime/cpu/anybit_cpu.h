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
void ab_gelu(ab_pool *pool, const float *x, int64_t n, float *out);
void ab_add(ab_pool *pool, const float *a, const float *b, int64_t n, float *out);
int64_t ab_argmax(const float *x, int64_t n);

/* Whole-forward fusion (kernels_decode.c). Linear weights in the A16 table layout; the kv caches are
 * (n_layers, T, Hkv, hd); x (M, d) holds the embeddings on entry and the residual stream on return;
 * logits (M or 1, out.N). */
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
} ab_lin;

typedef struct {
    const float *attn_norm;
    const float *ffn_norm;
    ab_lin qkv, wo, gate_up, down;
} ab_layer;

typedef struct {
    int n_layers, d, H, Hkv, hd, F, rope_style;
    int abits;                  /* 16: A16; 1..8: activations quantized per token and group (ab_lin Ga) */
    float eps, theta;
    const ab_layer *layers;
    const float *norm;
    ab_lin out;
} ab_model;

/* x R in place for M rows of K floats: blocks of b lanes (a power of two dividing K) times H_b / sqrt(b),
 * by the butterfly of loader/rotation.py in the same order, so the results are bitwise NumPy's. */
int ab_hadamard_rows(float *x, int M, int K, int b);

int ab_forward(ab_pool *pool, int isa, const ab_model *m, float *x, int M, int pos0, float *kc, float *vc,
               int T, int all_logits, float *logits);
