/* lutconv: LutConv's patch gather; see lutconv.h. */
#include "lutconv.h"

#include <immintrin.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "lutkernel.h"

struct lut_conv {
    int64_t cin, kh, kw, sh, sw, top, left, bottom, right, dh, dw, C;
    int64_t U;               /* distinct split dims ("columns") */
    int64_t *chan, *ky, *kx; /* [U]: each column's channel and kernel offsets */
    int64_t *columns;        /* [C*4]: each split dim's column */
    int64_t pkh, pkw, psh, psw; /* a fused MaxPool's window and strides; 0: none */
    struct cached_index *cache; /* lut_conv_index_for's, set once */
};

struct cached_index {
    int64_t H, W;
    int32_t *index;
};

#define FAIL_WITH(code, ...) do { if (err && errlen) snprintf(err, errlen, __VA_ARGS__); return code; } while (0)
#define FAIL(...) FAIL_WITH(LUT_EINVAL, __VA_ARGS__)
#define OUT_OF_MEMORY() FAIL_WITH(LUT_ENOMEM, "out of memory creating the LutConv patch encoder")

static int compare_int64(const void *a, const void *b) {
    const int64_t x = *(const int64_t *)a, y = *(const int64_t *)b;
    return (x > y) - (x < y);
}

void lut_conv_destroy(lut_conv *c) {
    if (!c) return;
    free(c->chan);
    free(c->ky);
    free(c->kx);
    free(c->columns);
    if (c->cache) {
        free(c->cache->index);
        free(c->cache);
    }
    free(c);
}

int lut_conv_create(lut_conv **out, int64_t in_channels, const int64_t kernel[2],
                    const int64_t strides[2], const int64_t pads[4], const int64_t dilations[2],
                    int64_t D, int64_t C, const int64_t *split_dims, int64_t n_split,
                    char *err, size_t errlen) {
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
    const int split_rc = lut_check_split_dims(D, C, split_dims, n_split, err, errlen);
    if (split_rc != LUT_OK) return split_rc;

    lut_conv *c = calloc(1, sizeof *c);
    if (!c) OUT_OF_MEMORY();
    /* the distinct split dims in ascending order (sorted, then deduplicated): the columns */
    int64_t *dims = malloc(sizeof(int64_t) * (size_t)n_split);
    c->columns = malloc(sizeof(int64_t) * (size_t)n_split);
    if (!dims || !c->columns) {
        free(dims);
        lut_conv_destroy(c);
        OUT_OF_MEMORY();
    }
    memcpy(dims, split_dims, sizeof(int64_t) * (size_t)n_split);
    qsort(dims, (size_t)n_split, sizeof(int64_t), compare_int64);
    for (int64_t i = 0; i < n_split; i++)
        if (i == 0 || dims[i] != dims[c->U - 1]) dims[c->U++] = dims[i];
    for (int64_t i = 0; i < n_split; i++) { /* binary search of the split dim among the columns */
        int64_t lo = 0, hi = c->U - 1;
        while (lo < hi) {
            const int64_t mid = lo + (hi - lo) / 2;
            if (dims[mid] < split_dims[i]) lo = mid + 1; else hi = mid;
        }
        c->columns[i] = lo;
    }
    c->chan = malloc(sizeof(int64_t) * (size_t)c->U);
    c->ky = malloc(sizeof(int64_t) * (size_t)c->U);
    c->kx = malloc(sizeof(int64_t) * (size_t)c->U);
    if (!c->chan || !c->ky || !c->kx) {
        free(dims);
        lut_conv_destroy(c);
        OUT_OF_MEMORY();
    }
    c->cin = in_channels; c->kh = kernel[0]; c->kw = kernel[1];
    c->sh = strides[0]; c->sw = strides[1]; c->dh = dilations[0]; c->dw = dilations[1];
    c->top = pads[0]; c->left = pads[1]; c->bottom = pads[2]; c->right = pads[3];
    c->C = C;
    for (int64_t u = 0; u < c->U; u++) { /* d = (chan*kh + ky)*kw + kx */
        const int64_t d = dims[u];
        c->kx[u] = d % c->kw;
        c->ky[u] = (d / c->kw) % c->kh;
        c->chan[u] = d / (c->kw * c->kh);
    }
    free(dims);
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

int64_t lut_conv_columns(const lut_conv *c) { return c->U; }

int lut_conv_set_pool(lut_conv *c, const int64_t kernel[2], const int64_t strides[2], char *err, size_t errlen) {
    for (int i = 0; i < 2; i++) {
        if (kernel[i] < 1 || kernel[i] > 4096) FAIL("max_pool window[%d] = %lld out of range [1, 4096]", i, (long long)kernel[i]);
        if (strides[i] < 1 || strides[i] > 4096) FAIL("max_pool strides[%d] = %lld out of range [1, 4096]", i, (long long)strides[i]);
    }
    c->pkh = kernel[0]; c->pkw = kernel[1]; c->psh = strides[0]; c->psw = strides[1];
    return LUT_OK;
}

int lut_conv_pooled(const lut_conv *c) { return c->pkh > 0; }

int lut_conv_pooled_size(const lut_conv *c, int64_t OH, int64_t OW, int64_t *PH, int64_t *PW) {
    if (!c->pkh) {
        *PH = OH;
        *PW = OW;
        return LUT_OK;
    }
    if (OH < c->pkh || OW < c->pkw) return LUT_EINVAL;
    *PH = (OH - c->pkh) / c->psh + 1;
    *PW = (OW - c->pkw) / c->psw + 1;
    return LUT_OK;
}

void lut_conv_pool_rows(const lut_conv *c, int64_t py0, int64_t py1, int64_t *r0, int64_t *r1) {
    *r0 = py0 * c->psh;
    *r1 = (py1 - 1) * c->psh + c->pkh;
}

/* the common 2 x 2 window at stride 2: 16 outputs from two 32-float runs of two rows */
__attribute__((target("avx512f")))
static void pool_2x2_avx512(const float *S, int64_t lds, int64_t M, int64_t OW, int64_t rows, int64_t PW,
                            float *Y, int64_t ldy) {
    const __m512i even = _mm512_set_epi32(30, 28, 26, 24, 22, 20, 18, 16, 14, 12, 10, 8, 6, 4, 2, 0);
    const __m512i odd = _mm512_add_epi32(even, _mm512_set1_epi32(1));
    for (int64_t m = 0; m < M; m++)
        for (int64_t py = 0; py < rows; py++) {
            const float *a = S + m * lds + 2 * py * OW, *b = a + OW;
            float *y = Y + m * ldy + py * PW;
            for (int64_t px = 0; px < PW; px += 16) {
                const int64_t n = PW - px < 16 ? PW - px : 16; /* outputs; they read 2n inputs */
                const __mmask16 lo = (__mmask16)(n >= 16 ? 0xFFFFu : (1u << n) - 1u);
                const __mmask16 lo_in = (__mmask16)(2 * n >= 16 ? 0xFFFFu : (1u << (2 * n)) - 1u);
                const __mmask16 hi_in = (__mmask16)(2 * n <= 16 ? 0u : 2 * n >= 32 ? 0xFFFFu : (1u << (2 * n - 16)) - 1u);
                const __m512 v0 = _mm512_max_ps(_mm512_maskz_loadu_ps(lo_in, a + 2 * px),
                                                _mm512_maskz_loadu_ps(lo_in, b + 2 * px));
                const __m512 v1 = _mm512_max_ps(_mm512_maskz_loadu_ps(hi_in, a + 2 * px + 16),
                                                _mm512_maskz_loadu_ps(hi_in, b + 2 * px + 16));
                const __m512 out = _mm512_max_ps(_mm512_permutex2var_ps(v0, even, v1),
                                                 _mm512_permutex2var_ps(v0, odd, v1));
                _mm512_mask_storeu_ps(y + px, lo, out);
            }
        }
}

void lut_conv_pool(const lut_conv *c, const float *S, int64_t lds, int64_t M, int64_t OW, int64_t py0,
                   int64_t py1, int64_t PW, float *Y, int64_t ldy, int path) {
    const int64_t rows = py1 - py0;
    if (path == LUT_PATH_AVX512 && c->pkh == 2 && c->pkw == 2 && c->psh == 2 && c->psw == 2) {
        pool_2x2_avx512(S, lds, M, OW, rows, PW, Y, ldy);
        return;
    }
    for (int64_t m = 0; m < M; m++)
        for (int64_t py = 0; py < rows; py++)
            for (int64_t px = 0; px < PW; px++) {
                const float *window = S + m * lds + py * c->psh * OW + px * c->psw;
                float best = window[0];
                for (int64_t ky = 0; ky < c->pkh; ky++)
                    for (int64_t kx = 0; kx < c->pkw; kx++) {
                        const float v = window[ky * OW + kx];
                        best = v > best ? v : best;
                    }
                Y[m * ldy + py * PW + px] = best;
            }
}

const int64_t *lut_conv_split_columns(const lut_conv *c) { return c->columns; }

int lut_conv_index_fits(const lut_conv *c, int64_t H, int64_t W) {
    return c->cin * H * W < INT32_MAX; /* cin <= 2^24, H, W <= 2^20: no overflow */
}

void lut_conv_index(const lut_conv *c, int64_t H, int64_t W, int32_t *index) {
    int64_t OH, OW;
    if (lut_conv_output_size(c, H, W, &OH, &OW) != LUT_OK || !lut_conv_index_fits(c, H, W)) return;
    const int64_t positions = OH * OW;
    for (int64_t u = 0; u < c->U; u++) {
        int32_t *dst = index + u * positions;
        for (int64_t oy = 0; oy < OH; oy++) {
            const int64_t y = oy * c->sh - c->top + c->ky[u] * c->dh;
            for (int64_t ox = 0; ox < OW; ox++) {
                const int64_t x = ox * c->sw - c->left + c->kx[u] * c->dw;
                dst[oy * OW + ox] = y >= 0 && y < H && x >= 0 && x < W ? (int32_t)((c->chan[u] * H + y) * W + x) : -1;
            }
        }
    }
}

/* stride 1 along x: one output row's positions of a column are contiguous input pixels.
 * Stores are whole 16-float vectors (masked stores are slow on Zen 4): lanes past a run land
 * on later positions of the column, rewritten by the runs that follow, or in the 16 floats
 * of slack each column has past `rows` (ld >= rows + 16). */
__attribute__((target("avx512f")))
static void gather_runs_avx512(const lut_conv *c, const float *X, int64_t H, int64_t W, int64_t OW,
                               int64_t first, int64_t rows, int64_t ld, float *P) {
    const __m512 zero = _mm512_setzero_ps();
    for (int64_t r = 0, pos = first; r < rows;) { /* the run of positions in output row oy */
        const int64_t oy = pos / OW, ox0 = pos % OW;
        const int64_t n = OW - ox0 < rows - r ? OW - ox0 : rows - r;
        const int64_t y0 = oy * c->sh - c->top;
        for (int64_t a = 0; a < n; a += 16) {
            const int64_t lanes_n = n - a < 16 ? n - a : 16;
            const __mmask16 lanes = (__mmask16)((1u << lanes_n) - 1u);
            for (int64_t u = 0; u < c->U; u++) {
                float *dst = P + u * ld + r + a;
                const int64_t y = y0 + c->ky[u] * c->dh;
                if (y < 0 || y >= H) {
                    _mm512_storeu_ps(dst, zero);
                    continue;
                }
                /* lane i reads x = x0 + i; lanes outside [0, W) are masked off (no access) */
                const int64_t x0 = ox0 + a - c->left + c->kx[u] * c->dw;
                const int64_t lo = x0 < 0 ? (-x0 < lanes_n ? -x0 : lanes_n) : 0;
                const int64_t hi = W - x0 < lanes_n ? (W - x0 > 0 ? W - x0 : 0) : lanes_n;
                const __mmask16 inside = (__mmask16)(lanes & ((1u << hi) - 1u) & ~((1u << lo) - 1u));
                const uintptr_t at = (uintptr_t)(X + (c->chan[u] * H + y) * W) + (uintptr_t)(x0 * (int64_t)sizeof(float));
                _mm512_storeu_ps(dst, _mm512_maskz_loadu_ps(inside, (const void *)at));
            }
        }
        r += n;
        pos += n;
    }
}

void lut_conv_gather(const lut_conv *c, const float *X, int64_t H, int64_t W, const int32_t *index,
                     int64_t first, int64_t rows, int64_t ld, int path, float *P) {
    int64_t OH, OW;
    if (lut_conv_output_size(c, H, W, &OH, &OW) != LUT_OK) return;
    if (path == LUT_PATH_AVX512 && c->sw == 1) {
        gather_runs_avx512(c, X, H, W, OW, first, rows, ld, P);
        return;
    }
    const int64_t positions = OH * OW;
    for (int64_t u = 0; u < c->U; u++) {
        const int32_t *at = index + u * positions + first;
        float *dst = P + u * ld;
        for (int64_t r = 0; r < rows; r++) {
            const int32_t i = at[r];
            dst[r] = i >= 0 ? X[i] : 0.0f;
        }
    }
}

const int32_t *lut_conv_index_for(lut_conv *c, int64_t H, int64_t W, int32_t **owned) {
    *owned = NULL;
    struct cached_index *cached = __atomic_load_n(&c->cache, __ATOMIC_ACQUIRE);
    if (cached && cached->H == H && cached->W == W) return cached->index;
    int64_t OH, OW;
    if (lut_conv_output_size(c, H, W, &OH, &OW) != LUT_OK || !lut_conv_index_fits(c, H, W)) return NULL;
    const int64_t positions = OH * OW; /* <= 2^42; U < 2^26 */
    if (positions > ((int64_t)1 << 40) / 4 / c->U) return NULL;
    int32_t *index = malloc(sizeof(int32_t) * (size_t)(c->U * positions));
    if (!index) return NULL;
    lut_conv_index(c, H, W, index);
    struct cached_index *entry = cached ? NULL : malloc(sizeof *entry);
    if (entry) {
        entry->H = H;
        entry->W = W;
        entry->index = index;
        struct cached_index *expected = NULL;
        if (__atomic_compare_exchange_n(&c->cache, &expected, entry, 0, __ATOMIC_ACQ_REL, __ATOMIC_ACQUIRE))
            return index;
        free(entry); /* another thread published first */
    }
    *owned = index;
    return index;
}
