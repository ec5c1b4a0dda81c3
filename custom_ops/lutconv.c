/* lutconv: LutConv's encoder; see lutconv.h. */
#include "lutconv.h"

#include <stdio.h>
#include <stdlib.h>

#include "lutkernel.h"

struct lut_conv {
    int64_t cin, kh, kw, sh, sw, top, left, bottom, right, dh, dw, C;
    /* per codebook and level: the channel and the kernel offsets of its split dimension */
    int64_t *chan, *ky, *kx; /* [C*4] */
    float *thresholds;       /* [C*15] */
};

#define FAIL(...) do { if (err && errlen) snprintf(err, errlen, __VA_ARGS__); return LUT_EINVAL; } while (0)

void lut_conv_destroy(lut_conv *c) {
    if (!c) return;
    free(c->chan);
    free(c->ky);
    free(c->kx);
    free(c->thresholds);
    free(c);
}

int lut_conv_create(lut_conv **out, int64_t in_channels, const int64_t kernel[2],
                    const int64_t strides[2], const int64_t pads[4], const int64_t dilations[2],
                    int64_t D, int64_t C, const int64_t *split_dims, int64_t n_split,
                    const float *thresholds, int64_t n_thresholds, char *err, size_t errlen) {
    *out = NULL;
    const int64_t big = (int64_t)1 << 24; /* generous bound: no product below can overflow */
    if (in_channels < 1 || in_channels > big) FAIL("in_channels %lld out of range", (long long)in_channels);
    for (int i = 0; i < 2; i++) {
        if (kernel[i] < 1 || kernel[i] > 4096) FAIL("kernel_shape[%d] = %lld out of range", i, (long long)kernel[i]);
        if (strides[i] < 1 || strides[i] > 4096) FAIL("strides[%d] = %lld out of range", i, (long long)strides[i]);
        if (dilations[i] < 1 || dilations[i] > 4096) FAIL("dilations[%d] = %lld out of range", i, (long long)dilations[i]);
    }
    for (int i = 0; i < 4; i++)
        if (pads[i] < 0 || pads[i] > 65536) FAIL("pads[%d] = %lld out of range", i, (long long)pads[i]);
    if (D != in_channels * kernel[0] * kernel[1])
        FAIL("D = %lld but in_channels*kh*kw = %lld", (long long)D, (long long)(in_channels * kernel[0] * kernel[1]));
    if (C < 1 || C >= big) FAIL("C = %lld out of range", (long long)C);
    if (n_split != C * LUT_DEPTH) FAIL("split_dims has %lld values, expected C*4 = %lld", (long long)n_split, (long long)(C * LUT_DEPTH));
    if (n_thresholds != C * LUT_NODES) FAIL("thresholds has %lld values, expected C*15 = %lld", (long long)n_thresholds, (long long)(C * LUT_NODES));
    for (int64_t i = 0; i < n_split; i++)
        if (split_dims[i] < 0 || split_dims[i] >= D)
            FAIL("split_dims value %lld at index %lld is outside [0, D=%lld)", (long long)split_dims[i], (long long)i, (long long)D);

    lut_conv *c = calloc(1, sizeof *c);
    if (!c) return LUT_ENOMEM;
    c->chan = malloc(sizeof(int64_t) * n_split);
    c->ky = malloc(sizeof(int64_t) * n_split);
    c->kx = malloc(sizeof(int64_t) * n_split);
    c->thresholds = malloc(sizeof(float) * n_thresholds);
    if (!c->chan || !c->ky || !c->kx || !c->thresholds) {
        lut_conv_destroy(c);
        return LUT_ENOMEM;
    }
    c->cin = in_channels; c->kh = kernel[0]; c->kw = kernel[1];
    c->sh = strides[0]; c->sw = strides[1]; c->dh = dilations[0]; c->dw = dilations[1];
    c->top = pads[0]; c->left = pads[1]; c->bottom = pads[2]; c->right = pads[3];
    c->C = C;
    for (int64_t i = 0; i < n_split; i++) { /* d = (chan*kh + ky)*kw + kx */
        int64_t d = split_dims[i];
        c->kx[i] = d % c->kw;
        c->ky[i] = (d / c->kw) % c->kh;
        c->chan[i] = d / (c->kw * c->kh);
    }
    for (int64_t i = 0; i < n_thresholds; i++) c->thresholds[i] = thresholds[i];
    *out = c;
    return LUT_OK;
}

int64_t lut_conv_in_channels(const lut_conv *c) { return c->cin; }

int lut_conv_output_size(const lut_conv *c, int64_t H, int64_t W, int64_t *OH, int64_t *OW) {
    if (H < 1 || W < 1 || H > LUT_CONV_MAX_SIDE || W > LUT_CONV_MAX_SIDE) return LUT_EINVAL;
    int64_t eh = H + c->top + c->bottom - c->dh * (c->kh - 1) - 1;
    int64_t ew = W + c->left + c->right - c->dw * (c->kw - 1) - 1;
    if (eh < 0 || ew < 0) return LUT_EINVAL;
    *OH = eh / c->sh + 1;
    *OW = ew / c->sw + 1;
    return LUT_OK;
}

void lut_conv_encode(const lut_conv *c, const float *X, int64_t H, int64_t W,
                     int64_t first, int64_t rows, uint8_t *codes) {
    int64_t OH, OW;
    if (lut_conv_output_size(c, H, W, &OH, &OW) != LUT_OK) return;
    (void)OH;
    for (int64_t r = 0; r < rows; r++) {
        int64_t pos = first + r, oy = pos / OW, ox = pos % OW;
        int64_t y0 = oy * c->sh - c->top, x0 = ox * c->sw - c->left;
        for (int64_t cb = 0; cb < c->C; cb++) {
            int node = 0;
            for (int level = 0; level < LUT_DEPTH; level++) {
                int64_t i = cb * LUT_DEPTH + level;
                int64_t y = y0 + c->ky[i] * c->dh, x = x0 + c->kx[i] * c->dw;
                float v = (y >= 0 && y < H && x >= 0 && x < W) ? X[(c->chan[i] * H + y) * W + x] : 0.0f;
                float t = c->thresholds[cb * LUT_NODES + (1 << level) - 1 + node];
                node = 2 * node + (v > t);
            }
            codes[r * c->C + cb] = (uint8_t)node;
        }
    }
}
