/* loader/pack_native.c: the packer's hot loops (the cffi declarations; see that file). */
#include <stdint.h>

#define ABL_Q4_0 2
#define ABL_Q4_1 3
#define ABL_Q8_0 8

int abl_pack_codes(const uint8_t *codes, int64_t N, int64_t Kp, int bits, uint32_t *planes, int threads);
int abl_exact(const uint8_t *raw, int type, int64_t N, int64_t K, int bits, uint32_t *planes, float *scales,
              float *offsets, int threads);
int abl_dequant(const uint8_t *raw, int type, int64_t N, int64_t K, double *out, int threads);
int abl_hadamard(double *x, int64_t rows, int64_t K, int b, int threads);
/* sqerr: (N, 2) per row: the squared error of the stored weight, the squared norm of the row */
int abl_quantize(const double *w, int64_t N, int64_t K, int bits, int group, int asym, const double *ratios,
                 int nratios, uint32_t *planes, int64_t Ntot, int64_t row0, float *scales, float *offsets,
                 double *sqerr, int threads);
