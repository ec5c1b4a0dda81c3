/*
 * lutkernel: the LutMatMul kernel (encode + scan) shared by the cffi extension
 * (lutcompile._lutkernel) and the onnxruntime custom-op library (lutcompile._lutops).
 *
 * Semantics: docs/lutmatmul.md.  Every path (scalar; AVX2; AVX-512 with F, BW, VL, VBMI and
 * VNNI, i.e. Ice Lake / Zen 4 and later) produces identical codes and bit-identical outputs.
 * One compile without -march flags holds all paths (GCC target attributes); the path is
 * picked at run time:
 *
 *   path argument  -1 (LUT_PATH_AUTO): the environment variable LUTCOMPILE_KERNEL_PATH
 *                  (scalar | avx2 | avx512 | auto) if set, else the best supported path
 *                  (AVX-512, then AVX2, then scalar);
 *                  LUT_PATH_SCALAR / LUT_PATH_AVX2 / LUT_PATH_AVX512: that path, or an
 *                  error (LUT_EPATH) if this CPU does not support it.
 *
 * Functions that can fail return a LUT_* status and, when err != NULL, write a
 * NUL-terminated message naming the problem into err[0..errlen).
 */
#ifndef LUTKERNEL_H
#define LUTKERNEL_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

/* status codes */
#define LUT_OK 0
#define LUT_EINVAL 1  /* malformed parameters or arguments */
#define LUT_ENOMEM 2  /* allocation failed */
#define LUT_EPATH 3   /* requested path unknown or unsupported on this CPU */

/* kernel paths (bit i of lut_paths_available() <=> path i is supported) */
#define LUT_PATH_AUTO (-1)
#define LUT_PATH_SCALAR 0
#define LUT_PATH_AVX2 1
#define LUT_PATH_AVX512 2
#define LUT_NUM_PATHS 3

#define LUT_K 16       /* prototypes per codebook */
#define LUT_DEPTH 4    /* tree levels per codebook */
#define LUT_NODES 15   /* thresholds per codebook */

/* Bitmask of supported paths on this CPU (bit LUT_PATH_*); scalar is always set. */
int lut_paths_available(void);

/* "scalar", "avx2", "avx512", or "unknown". */
const char *lut_path_name(int path);

/* Resolve a requested path (LUT_PATH_AUTO honours LUTCOMPILE_KERNEL_PATH) to a concrete,
 * supported path.  Returns the path (>= 0) or -LUT_EPATH with a message in err. */
int lut_resolve_path(int requested, char *err, size_t errlen);

/* Size limits: split dimensions are stored as int32, so D <= LUT_MAX_D; LUT_MAX_M keeps
 * every padded table size far from int64 overflow; C < 2^24 keeps the uint32 sums exact. */
#define LUT_MAX_D INT32_MAX
#define LUT_MAX_M ((int64_t)1 << 40)
#define LUT_MAX_C ((int64_t)1 << 24)

/* LUT_OK if 1 <= D <= LUT_MAX_D, 1 <= M <= LUT_MAX_M, 1 <= C < LUT_MAX_C and K == 16, else
 * LUT_EINVAL with a message naming the first bad attribute ("attribute 'M' must ..."). */
int lut_check_sizes(int64_t D, int64_t M, int64_t C, int64_t K, char *err, size_t errlen);

/* LUT_OK if split_dims holds n_split == C*4 values in [0, D), else LUT_EINVAL with a message
 * naming the first bad one ("attribute 'split_dims' ..."); lut_plan_create's check. */
int lut_check_split_dims(int64_t D, int64_t C, const int64_t *split_dims, int64_t n_split,
                         char *err, size_t errlen);

/* An immutable, validated LutMatMul parameter set holding its tables once, repacked into one
 * layout that every path reads (scalar, AVX2 and AVX-512 alike).  Thread-safe to use
 * concurrently once created. */
typedef struct lut_plan lut_plan;

/* Validates and copies everything (the caller keeps ownership of its arrays).
 *   split_dims: n_split == C*4 values in [0, D)
 *   thresholds: n_thresholds == C*15 values (any float; NaN compares false)
 *   tables:     n_tables == M*C*16 bytes, layout [M][C][16]
 *   scale:      finite and > 0
 *   offsets:    n_offsets == C finite values;  bias: n_bias == M finite values
 *   K == 16, relu in {0, 1}, sizes as lut_check_sizes. */
int lut_plan_create(lut_plan **out, int64_t D, int64_t M, int64_t C, int64_t K,
                    const int64_t *split_dims, int64_t n_split,
                    const float *thresholds, int64_t n_thresholds,
                    const uint8_t *tables, int64_t n_tables,
                    float scale,
                    const float *offsets, int64_t n_offsets,
                    const float *bias, int64_t n_bias,
                    int64_t relu, char *err, size_t errlen);

/* An encode-only plan (M = 0): lut_encode works, lut_scan / lut_apply refuse it. */
int lut_encoder_create(lut_plan **out, int64_t D, int64_t C,
                       const int64_t *split_dims, int64_t n_split,
                       const float *thresholds, int64_t n_thresholds,
                       char *err, size_t errlen);

void lut_plan_destroy(lut_plan *plan);

int64_t lut_plan_D(const lut_plan *plan);
int64_t lut_plan_M(const lut_plan *plan);
int64_t lut_plan_C(const lut_plan *plan);

/* codes[N][C] (row-major, one code 0..15 per row and codebook) of X[N][D]. */
int lut_encode(const lut_plan *plan, const float *X, int64_t N, uint8_t *codes,
               int path, char *err, size_t errlen);

/* Y[N][M] from codes[N][C] (each code is used modulo 16; callers should pass 0..15). */
int lut_scan(const lut_plan *plan, const uint8_t *codes, int64_t N, float *Y,
             int path, char *err, size_t errlen);

/* Y[N][M] = scan(encode(X[N][D])), fused block by block (no [N][C] code buffer). */
int lut_apply(const lut_plan *plan, const float *X, int64_t N, float *Y,
              int path, char *err, size_t errlen);

/* lut_apply with X and Y dimension-major: row n's dimension d is Xt[d*ldx + n] and its
 * output m goes to Yt[m*ldy + n]; ldx, ldy >= N.  LutConv's layout: the gathered patches
 * (each split dim's rows one contiguous run) in, NCHW out.
 * work[work_len]: scratch for the call, 64-byte aligned, of at least
 * lut_apply_columns_work(plan, path) bytes, so that a caller making many small calls (one per
 * tile of positions) allocates it once; when it is NULL or smaller, the call allocates (and
 * frees) its own.  A buffer must not be shared by concurrent calls. */
int lut_apply_columns(const lut_plan *plan, const float *Xt, int64_t ldx, int64_t N, float *Yt,
                      int64_t ldy, void *work, size_t work_len, int path, char *err, size_t errlen);

/* The scratch bytes lut_apply_columns needs on `path` (0: none, or an unsupported path). */
size_t lut_apply_columns_work(const lut_plan *plan, int path);

#ifdef __cplusplus
}
#endif

#endif /* LUTKERNEL_H */
