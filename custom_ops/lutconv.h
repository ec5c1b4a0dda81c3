/*
 * lutconv: LutConv's encoder (docs/lutmatmul.md, "The LutConv operator").
 *
 * Patches are never materialised: a codebook's tree reads only its 4 split dimensions, so
 * each is decoded once, at creation, into (channel, ky, kx), and the encoder reads those
 * pixels straight from the NCHW input (zero outside the image). The codes then go through
 * lut_scan like LutMatMul's.
 */
#ifndef LUTCONV_H
#define LUTCONV_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

typedef struct lut_conv lut_conv;

/* Validates the geometry against the tree arrays (the LutMatMul checks are lut_plan's):
 * in_channels, kernel, strides and dilations >= 1, pads >= 0, D == in_channels*kh*kw,
 * split dims in [0, D), thresholds n == C*15. Copies what it keeps. */
int lut_conv_create(lut_conv **out, int64_t in_channels, const int64_t kernel[2],
                    const int64_t strides[2], const int64_t pads[4], const int64_t dilations[2],
                    int64_t D, int64_t C, const int64_t *split_dims, int64_t n_split,
                    const float *thresholds, int64_t n_thresholds, char *err, size_t errlen);

void lut_conv_destroy(lut_conv *conv);

int64_t lut_conv_in_channels(const lut_conv *conv);

/* Largest input height and width the op accepts. */
#define LUT_CONV_MAX_SIDE ((int64_t)1 << 20)

/* Output size for an H x W input, 1 <= H, W <= LUT_CONV_MAX_SIDE; returns 0 and sets
 * 1 <= *OH, *OW <= 2^21 (pads are at most 2^16 a side), or LUT_EINVAL when the (padded)
 * input is smaller than the dilated kernel or H, W are out of range. */
int lut_conv_output_size(const lut_conv *conv, int64_t H, int64_t W, int64_t *OH, int64_t *OW);

/* codes[rows][C] of output positions first .. first+rows-1 (flat oy*OW + ox) of one image
 * X[in_channels][H][W]. */
void lut_conv_encode(const lut_conv *conv, const float *X, int64_t H, int64_t W,
                     int64_t first, int64_t rows, uint8_t *codes);

#ifdef __cplusplus
}
#endif

#endif /* LUTCONV_H */
