/*
 * lutconv: LutConv's patch gather (docs/lutmatmul.md, "The LutConv operator").
 *
 * Patches are never materialised: the trees read only their split dimensions, at most 4C of
 * the patch's D = Cin*kh*kw. At creation the distinct split dims are listed once, in
 * ascending order, as U "columns", each decoded into (channel, ky, kx). For a tile of output
 * positions, lut_conv_gather copies just those U pixels per position (zero outside the image)
 * into a small dimension-major buffer P[U][tile], through a table of pixel offsets built once
 * per input size and cached (lut_conv_index_for), and the op runs the ordinary LutMatMul plan over P
 * with its split dims renumbered to columns (lut_conv_split_columns, lut_apply_columns): the
 * SIMD encode and scan of lutkernel.c, bit for bit the semantics of encoding the full patch.
 */
#ifndef LUTCONV_H
#define LUTCONV_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

typedef struct lut_conv lut_conv;

/* Validates the geometry against the split dims (the other LutMatMul checks are lut_plan's):
 * in_channels, kernel, strides and dilations >= 1, pads >= 0, D == in_channels*kh*kw, and
 * the split dims with lut_check_split_dims (n_split == C*4, each in [0, D)), so the op checks
 * them once, here, and builds its one plan over the renumbered columns. Copies what it keeps. */
int lut_conv_create(lut_conv **out, int64_t in_channels, const int64_t kernel[2],
                    const int64_t strides[2], const int64_t pads[4], const int64_t dilations[2],
                    int64_t D, int64_t C, const int64_t *split_dims, int64_t n_split,
                    char *err, size_t errlen);

void lut_conv_destroy(lut_conv *conv);

int64_t lut_conv_in_channels(const lut_conv *conv);

/* Largest input height and width the op accepts. */
#define LUT_CONV_MAX_SIDE ((int64_t)1 << 20)

/* Output size for an H x W input, 1 <= H, W <= LUT_CONV_MAX_SIDE; returns 0 and sets
 * 1 <= *OH, *OW <= 2^21 (pads are at most 2^16 a side), or LUT_EINVAL when the (padded)
 * input is smaller than the dilated kernel or H, W are out of range. */
int lut_conv_output_size(const lut_conv *conv, int64_t H, int64_t W, int64_t *OH, int64_t *OW);

/* A MaxPool fused after the convolution (docs/lutmatmul.md, attribute `max_pool`): window
 * kernel[0] x kernel[1], strides[0] x strides[1], each 1 to 4096, no padding, dilation 1,
 * floor rounding.  The op then writes the pooled output, and the full-size one never leaves
 * the worker's cache.  Validated here; LUT_EINVAL with a message otherwise. */
int lut_conv_set_pool(lut_conv *conv, const int64_t kernel[2], const int64_t strides[2], char *err, size_t errlen);

/* 1 when a MaxPool is fused (lut_conv_set_pool), else 0. */
int lut_conv_pooled(const lut_conv *conv);

/* The op's output size for a convolution output of OH x OW: with a fused MaxPool the pooled
 * size, LUT_EINVAL when OH or OW is smaller than its window; otherwise OH x OW itself. */
int lut_conv_pooled_size(const lut_conv *conv, int64_t OH, int64_t OW, int64_t *PH, int64_t *PW);

/* The convolution rows pooled rows [py0, py1) read: rows *r0 .. *r1 - 1 (r1 <= OH when py1 <= PH). */
void lut_conv_pool_rows(const lut_conv *conv, int64_t py0, int64_t py1, int64_t *r0, int64_t *r1);

/* The fused MaxPool over M channels: S[m*lds + (r - r0)*OW + x] holds convolution row r of
 * channel m for the rows lut_conv_pool_rows gives for pooled rows [py0, py1); writes
 * Y[m*ldy + (py - py0)*PW + px].  The maximum of finite floats, so the order of the
 * comparisons cannot change a bit. */
void lut_conv_pool(const lut_conv *conv, const float *S, int64_t lds, int64_t M, int64_t OW, int64_t py0,
                   int64_t py1, int64_t PW, float *Y, int64_t ldy, int path);

/* U: the number of distinct split dims (1 <= U <= min(C*4, D)). */
int64_t lut_conv_columns(const lut_conv *conv);

/* [C*4]: each split dim's column in P, the split dims of the plan lut_conv_gather feeds. */
const int64_t *lut_conv_split_columns(const lut_conv *conv);

/* Where each column of each output position lives in an image of H x W (which must have
 * passed lut_conv_output_size): index[u*OH*OW + pos] is the offset of column u's pixel for
 * position pos in X[in_channels][H][W], or -1 where the patch hangs over the padding. The
 * same for every image of a batch, so it is built once per call. Needs in_channels*H*W <
 * 2^31 (lut_conv_index_fits). */
int lut_conv_index_fits(const lut_conv *conv, int64_t H, int64_t W);
void lut_conv_index(const lut_conv *conv, int64_t H, int64_t W, int32_t *index);

/* The index for H x W, built once and kept for the first size it is asked for (thread-safe:
 * published with a compare-and-swap, freed by lut_conv_destroy). For any other size a fresh
 * one is built and returned in *owned as well, for the caller to free. NULL when out of
 * memory or when the index would not fit (U * OH * OW * 4 bytes over 2^40). */
const int32_t *lut_conv_index_for(lut_conv *conv, int64_t H, int64_t W, int32_t **owned);

/* The split pixels of output positions first .. first+rows-1 of one image X[in_channels][H][W],
 * dimension-major: P[u*ld + r] = column u of position first + r (0 in the padding), ready for
 * lut_apply_columns; index as from lut_conv_index for H x W, and ld >= rows + 16 (slack for
 * whole-vector stores).
 * With path LUT_PATH_AVX512 and stride 1 along x, a column's positions in one output row are
 * one contiguous run of an input row, copied 16 at a time with masked loads (the mask also
 * zeroes the padding); otherwise each value is read through the index. */
void lut_conv_gather(const lut_conv *conv, const float *X, int64_t H, int64_t W, const int32_t *index,
                     int64_t first, int64_t rows, int64_t ld, int path, float *P);

#ifdef __cplusplus
}
#endif

#endif /* LUTCONV_H */
