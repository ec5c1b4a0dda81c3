/* spnkernel: StrassenNets' sum-product layer; see spnkernel.h. */
#include "spnkernel.h"

#include <immintrin.h>
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "lut_errors.h"
#include "lutkernel.h"

/* One packed ternary matrix as the plan keeps it: row r's inputs of weight +1 are
 * idx[start[r] .. mid[r]), those of -1 idx[mid[r] .. start[r + 1]), each ascending. */
typedef struct {
    int64_t rows;
    int64_t *start, *mid;
    int32_t *idx;
} ternary_rows;

/* One ternary matrix by input for the few-rows path: bit u of lanes[(phase * cols + i) * blocks + k]
 * says row 16k + u has weight +1 (phase 0) or -1 (phase 1) at input i. */
typedef struct {
    int64_t blocks; /* ceil(rows / 16) */
    uint16_t *lanes;
} ternary_lanes;

struct spn_plan {
    int64_t D, M, R;
    int relu;
    ternary_rows b, c; /* W_b: R rows over D inputs; W_c: M rows over R hidden units */
    ternary_lanes bl, cl; /* the same by input; lanes NULL when they would exceed LANES_MAX bytes */
    float *a, *bias;  /* a, bias: padded with zeros to whole blocks of 16 */
};

/* Few rows (N <= ROW_PATH_MAX_N): each row alone, input by input, 16 hidden units (outputs) a
 * vector: for the +1 phase, for i = 0, 1, ...: h += x[i] in the lanes whose weight at i is +1,
 * then the same for -1 with subtractions. Every unit sees its +1 inputs ascending, then its -1
 * inputs ascending: the scalar fold, bit for bit. It costs 2 * D * ceil(R / 16) masked adds a
 * row where a group of 16 rows costs one add per nonzero weight; on the MNIST MLP at r = M it
 * won up to 4 rows (whole model: 19 us at 1 row, about 14 more per row, against 77 us for a
 * group of up to 16; AMD EPYC). */
#define ROW_PATH_MAX_N 4
#define LANES_MAX ((int64_t)1 << 26)


int64_t spn_packed_bytes(int64_t rows, int64_t cols) { return rows * ((cols + 3) / 4); }

static void free_rows(ternary_rows *t) {
    free(t->start);
    free(t->mid);
    free(t->idx);
}

void spn_plan_destroy(spn_plan *p) {
    if (!p) return;
    free_rows(&p->b);
    free_rows(&p->c);
    free(p->bl.lanes);
    free(p->cl.lanes);
    free(p->a);
    free(p->bias);
    free(p);
}

/* Unpack a rows x cols matrix (spn_packed_bytes of it, checked by the caller) into index lists. */
static int unpack(ternary_rows *t, const char *name, const uint8_t *packed, int64_t rows, int64_t cols,
                  char *err, size_t errlen) {
    const int64_t stride = (cols + 3) / 4;
    int64_t nonzero = 0;
    for (int64_t r = 0; r < rows; r++)
        for (int64_t i = 0; i < stride * 4; i++) {
            const unsigned code = (packed[r * stride + i / 4] >> (2 * (i % 4))) & 3u;
            if (code == 3)
                return set_err(err, errlen, LUT_EINVAL, "attribute '%s': row %lld, entry %lld holds code 3 "
                            "(only 0, 1 = +1 and 2 = -1 are weights)", name, (long long)r, (long long)i);
            if (code && i >= cols)
                return set_err(err, errlen, LUT_EINVAL, "attribute '%s': row %lld has a weight past its %lld "
                            "entries (the last byte's unused bits must be 0)", name, (long long)r, (long long)cols);
            nonzero += code != 0;
        }
    t->rows = rows;
    t->start = (int64_t *)malloc(sizeof(int64_t) * (size_t)(rows + 1));
    t->mid = (int64_t *)malloc(sizeof(int64_t) * (size_t)(rows > 0 ? rows : 1));
    t->idx = (int32_t *)malloc(sizeof(int32_t) * (size_t)(nonzero > 0 ? nonzero : 1));
    if (!t->start || !t->mid || !t->idx) return set_err(err, errlen, LUT_ENOMEM, "out of memory unpacking '%s'", name);
    int64_t k = 0;
    for (int64_t r = 0; r < rows; r++) {
        t->start[r] = k;
        for (unsigned want = 1; want <= 2; want++) {
            if (want == 2) t->mid[r] = k;
            for (int64_t i = 0; i < cols; i++)
                if (((packed[r * stride + i / 4] >> (2 * (i % 4))) & 3u) == want) t->idx[k++] = (int32_t)i;
        }
    }
    t->start[rows] = k;
    return LUT_OK;
}

/* t's rows as lanes by input (see ternary_lanes); lanes stays NULL when too large or out of memory
 * (then the blocks serve every N). */
static void by_input(const ternary_rows *t, int64_t cols, ternary_lanes *out) {
    out->blocks = (t->rows + 15) / 16;
    if (2 * cols * out->blocks * (int64_t)sizeof(uint16_t) > LANES_MAX) return;
    out->lanes = (uint16_t *)calloc((size_t)(2 * cols * out->blocks), sizeof(uint16_t));
    if (!out->lanes) return;
    for (int64_t r = 0; r < t->rows; r++)
        for (int64_t k = t->start[r]; k < t->start[r + 1]; k++) {
            const int64_t phase = k >= t->mid[r], i = t->idx[k];
            out->lanes[(phase * cols + i) * out->blocks + r / 16] |= (uint16_t)(1u << (r % 16));
        }
}

/* v[n] (n == want, every value finite) copied into `padded` >= want floats, zeros past want */
static int copy_finite(float **out, const char *name, const float *v, int64_t n, int64_t want, int64_t padded,
                       char *err, size_t errlen) {
    if (!v || n != want)
        return set_err(err, errlen, LUT_EINVAL, "attribute '%s' must have %lld values, got %lld", name,
                    (long long)want, (long long)(v ? n : 0));
    for (int64_t i = 0; i < n; i++)
        if (!isfinite(v[i]))
            return set_err(err, errlen, LUT_EINVAL, "attribute '%s' holds a value that is not finite (at %lld)", name,
                        (long long)i);
    *out = (float *)calloc((size_t)padded, sizeof(float));
    if (!*out) return set_err(err, errlen, LUT_ENOMEM, "out of memory copying '%s'", name);
    memcpy(*out, v, sizeof(float) * (size_t)n);
    return LUT_OK;
}

int spn_plan_create(spn_plan **out, int64_t D, int64_t M, int64_t R, const uint8_t *wb, int64_t n_wb,
                    const float *a, int64_t n_a, const uint8_t *wc, int64_t n_wc, const float *bias,
                    int64_t n_bias, int64_t relu, char *err, size_t errlen) {
    *out = NULL;
    const int64_t most = INT32_MAX;
    if (D < 1 || D > most) return set_err(err, errlen, LUT_EINVAL, "attribute 'D' = %lld out of range [1, 2^31 - 1]", (long long)D);
    if (M < 1 || M > most) return set_err(err, errlen, LUT_EINVAL, "attribute 'M' = %lld out of range [1, 2^31 - 1]", (long long)M);
    if (R < 1 || R > most) return set_err(err, errlen, LUT_EINVAL, "attribute 'R' = %lld out of range [1, 2^31 - 1]", (long long)R);
    if (R > ((int64_t)1 << 36) / (D > M ? D : M))
        return set_err(err, errlen, LUT_EINVAL, "R * max(D, M) = %lld * %lld exceeds 2^36 weights", (long long)R,
                    (long long)(D > M ? D : M));
    if (relu != 0 && relu != 1) return set_err(err, errlen, LUT_EINVAL, "attribute 'relu' must be 0 or 1, got %lld", (long long)relu);
    if (!wb || n_wb != spn_packed_bytes(R, D))
        return set_err(err, errlen, LUT_EINVAL, "attribute 'wb' must hold R * ceil(D / 4) = %lld bytes, got %lld",
                    (long long)spn_packed_bytes(R, D), (long long)(wb ? n_wb : 0));
    if (!wc || n_wc != spn_packed_bytes(M, R))
        return set_err(err, errlen, LUT_EINVAL, "attribute 'wc' must hold M * ceil(R / 4) = %lld bytes, got %lld",
                    (long long)spn_packed_bytes(M, R), (long long)(wc ? n_wc : 0));
    spn_plan *p = (spn_plan *)calloc(1, sizeof *p);
    if (!p) return set_err(err, errlen, LUT_ENOMEM, "out of memory creating the SpnMatMul plan");
    p->D = D;
    p->M = M;
    p->R = R;
    p->relu = (int)relu;
    int rc = unpack(&p->b, "wb", wb, R, D, err, errlen);
    if (rc == LUT_OK) rc = unpack(&p->c, "wc", wc, M, R, err, errlen);
    if (rc == LUT_OK) rc = copy_finite(&p->a, "a", a, n_a, R, (R + 15) / 16 * 16, err, errlen);
    if (rc == LUT_OK) rc = copy_finite(&p->bias, "bias", bias, n_bias, M, (M + 15) / 16 * 16, err, errlen);
    if (rc != LUT_OK) {
        spn_plan_destroy(p);
        return rc;
    }
    by_input(&p->b, D, &p->bl);
    by_input(&p->c, R, &p->cl);
    *out = p;
    return LUT_OK;
}

/* ------------------------------------------------------------------------------------ */
/* scalar: one row at a time, the fold as spnkernel.h writes it                          */

static float fold_scalar(const ternary_rows *t, int64_t r, const float *x) {
    float h = 0.0f;
    for (int64_t k = t->start[r]; k < t->mid[r]; k++) h = h + x[t->idx[k]];
    for (int64_t k = t->mid[r]; k < t->start[r + 1]; k++) h = h - x[t->idx[k]];
    return h;
}

static void rows_scalar(const spn_plan *p, const float *X, int64_t N, float *Y, float *s) {
    for (int64_t n = 0; n < N; n++) {
        const float *x = X + n * p->D;
        for (int64_t j = 0; j < p->R; j++) s[j] = fold_scalar(&p->b, j, x) * p->a[j];
        for (int64_t m = 0; m < p->M; m++) {
            float y = fold_scalar(&p->c, m, s) + p->bias[m];
            Y[n * p->M + m] = p->relu ? (y > 0.0f ? y : 0.0f) : y;
        }
    }
}

/* ------------------------------------------------------------------------------------ */
/* SIMD: G rows a step, one row per lane; X's G rows transposed into Xt[D][G] first        */

/* Xt[d*G + r] = X[r][d] for the g <= G rows of a group, 0 for the lanes past them */
static void transpose_rows(const float *X, int64_t D, int g, int G, float *Xt) {
    for (int64_t d = 0; d < D; d++)
        for (int r = 0; r < G; r++) Xt[d * G + r] = r < g ? X[(int64_t)r * D + d] : 0.0f;
}

/* Y[r][m] = Yt[m*G + r] for the group's g rows */
static void untranspose_rows(const float *Yt, int64_t M, int g, int G, float *Y) {
    for (int r = 0; r < g; r++)
        for (int64_t m = 0; m < M; m++) Y[(int64_t)r * M + m] = Yt[m * G + r];
}

__attribute__((target("avx2")))
static __m256 fold_avx2(const ternary_rows *t, int64_t r, const float *xt) {
    __m256 h = _mm256_setzero_ps();
    for (int64_t k = t->start[r]; k < t->mid[r]; k++) h = _mm256_add_ps(h, _mm256_load_ps(xt + (int64_t)t->idx[k] * 8));
    for (int64_t k = t->mid[r]; k < t->start[r + 1]; k++) h = _mm256_sub_ps(h, _mm256_load_ps(xt + (int64_t)t->idx[k] * 8));
    return h;
}

/* Rows r .. r+3 of t at once: four independent chains of adds, so the adds' latency overlaps
 * (one chain alone waits on each add); each chain keeps its own order. */
#define FOLD4(VEC, ZERO, ADD, SUB, LOAD, LANES)                                                        \
    VEC h0 = ZERO, h1 = ZERO, h2 = ZERO, h3 = ZERO;                                                    \
    for (int phase = 0; phase < 2; phase++) {                                                          \
        int64_t k[4], e[4], common = INT64_MAX;                                                         \
        for (int q = 0; q < 4; q++) {                                                                  \
            k[q] = phase ? t->mid[r + q] : t->start[r + q];                                            \
            e[q] = phase ? t->start[r + q + 1] : t->mid[r + q];                                        \
            common = e[q] - k[q] < common ? e[q] - k[q] : common;                                      \
        }                                                                                              \
        const int32_t *ix = t->idx;                                                                    \
        for (int64_t i = 0; i < common; i++) {                                                         \
            VEC v0 = LOAD(xt + (int64_t)ix[k[0] + i] * LANES), v1 = LOAD(xt + (int64_t)ix[k[1] + i] * LANES); \
            VEC v2 = LOAD(xt + (int64_t)ix[k[2] + i] * LANES), v3 = LOAD(xt + (int64_t)ix[k[3] + i] * LANES); \
            h0 = phase ? SUB(h0, v0) : ADD(h0, v0);                                                    \
            h1 = phase ? SUB(h1, v1) : ADD(h1, v1);                                                    \
            h2 = phase ? SUB(h2, v2) : ADD(h2, v2);                                                    \
            h3 = phase ? SUB(h3, v3) : ADD(h3, v3);                                                    \
        }                                                                                              \
        VEC *hs[4] = {&h0, &h1, &h2, &h3};                                                              \
        for (int q = 0; q < 4; q++)                                                                    \
            for (int64_t i = k[q] + common; i < e[q]; i++) {                                           \
                const VEC v = LOAD(xt + (int64_t)ix[i] * LANES);                                       \
                *hs[q] = phase ? SUB(*hs[q], v) : ADD(*hs[q], v);                                      \
            }                                                                                          \
    }                                                                                                  \
    out[0] = h0; out[1] = h1; out[2] = h2; out[3] = h3;

__attribute__((target("avx2")))
static void fold4_avx2(const ternary_rows *t, int64_t r, const float *xt, __m256 out[4]) {
    FOLD4(__m256, _mm256_setzero_ps(), _mm256_add_ps, _mm256_sub_ps, _mm256_load_ps, 8)
}

/* One group of rows (a lane each): s = fold(W_b) * a, then Y = fold(W_c over s) + bias, 4 rows of W at a time */
__attribute__((target("avx2")))
static void group_avx2(const spn_plan *p, const float *xt, float *st, float *yt) {
    __m256 h[4];
    for (int64_t j = 0; j < p->R; j += 4) {
        const int n = p->R - j < 4 ? (int)(p->R - j) : 4;
        if (n == 4) fold4_avx2(&p->b, j, xt, h);
        for (int q = 0; q < n; q++)
            _mm256_store_ps(st + (j + q) * 8, _mm256_mul_ps(n == 4 ? h[q] : fold_avx2(&p->b, j + q, xt),
                                                          _mm256_set1_ps(p->a[j + q])));
    }
    for (int64_t m = 0; m < p->M; m += 4) {
        const int n = p->M - m < 4 ? (int)(p->M - m) : 4;
        if (n == 4) fold4_avx2(&p->c, m, st, h);
        for (int q = 0; q < n; q++) {
            __m256 y = _mm256_add_ps(n == 4 ? h[q] : fold_avx2(&p->c, m + q, st), _mm256_set1_ps(p->bias[m + q]));
            if (p->relu) y = _mm256_max_ps(y, _mm256_setzero_ps()); /* y > 0 ? y : +0, NaN -> +0 */
            _mm256_store_ps(yt + (m + q) * 8, y);
        }
    }
}

__attribute__((target("avx512f")))
static __m512 fold_avx512(const ternary_rows *t, int64_t r, const float *xt) {
    __m512 h = _mm512_setzero_ps();
    for (int64_t k = t->start[r]; k < t->mid[r]; k++) h = _mm512_add_ps(h, _mm512_load_ps(xt + (int64_t)t->idx[k] * 16));
    for (int64_t k = t->mid[r]; k < t->start[r + 1]; k++) h = _mm512_sub_ps(h, _mm512_load_ps(xt + (int64_t)t->idx[k] * 16));
    return h;
}

__attribute__((target("avx512f")))
static void fold4_avx512(const ternary_rows *t, int64_t r, const float *xt, __m512 out[4]) {
    FOLD4(__m512, _mm512_setzero_ps(), _mm512_add_ps, _mm512_sub_ps, _mm512_load_ps, 16)
}

__attribute__((target("avx512f")))
static void group_avx512(const spn_plan *p, const float *xt, float *st, float *yt) {
    __m512 h[4];
    for (int64_t j = 0; j < p->R; j += 4) {
        const int n = p->R - j < 4 ? (int)(p->R - j) : 4;
        if (n == 4) fold4_avx512(&p->b, j, xt, h);
        for (int q = 0; q < n; q++)
            _mm512_store_ps(st + (j + q) * 16, _mm512_mul_ps(n == 4 ? h[q] : fold_avx512(&p->b, j + q, xt),
                                                           _mm512_set1_ps(p->a[j + q])));
    }
    for (int64_t m = 0; m < p->M; m += 4) {
        const int n = p->M - m < 4 ? (int)(p->M - m) : 4;
        if (n == 4) fold4_avx512(&p->c, m, st, h);
        for (int q = 0; q < n; q++) {
            __m512 y = _mm512_add_ps(n == 4 ? h[q] : fold_avx512(&p->c, m + q, st), _mm512_set1_ps(p->bias[m + q]));
            if (p->relu) y = _mm512_max_ps(y, _mm512_setzero_ps());
            _mm512_store_ps(yt + (m + q) * 16, y);
        }
    }
}

/* ------------------------------------------------------------------------------------ */
/* few rows: one row at a time, input by input (ROW_PATH_MAX_N above)                      */

/* out[k*16 + u] = fold of row 16k + u of the matrix `l` holds, over the inputs x[0 .. cols):
 * the masked adds of one phase, then the other, a chunk of up to 8 blocks of 16 rows at a time
 * (independent chains, in registers). */
__attribute__((target("avx512f")))
static void fold_lanes_avx512(const ternary_lanes *l, int64_t cols, const float *x, float *out) {
    for (int64_t k0 = 0; k0 < l->blocks; k0 += 8) {
        const int nk = l->blocks - k0 < 8 ? (int)(l->blocks - k0) : 8;
        __m512 h[8];
        for (int q = 0; q < 8; q++) h[q] = _mm512_setzero_ps();
        for (int64_t phase = 0; phase < 2; phase++) {
            const uint16_t *m = l->lanes + phase * cols * l->blocks + k0;
            for (int64_t i = 0; i < cols; i++, m += l->blocks) {
                const __m512 v = _mm512_set1_ps(x[i]);
                for (int q = 0; q < nk; q++)
                    h[q] = phase ? _mm512_mask_sub_ps(h[q], (__mmask16)m[q], h[q], v)
                                 : _mm512_mask_add_ps(h[q], (__mmask16)m[q], h[q], v);
            }
        }
        for (int q = 0; q < nk; q++) _mm512_store_ps(out + (k0 + q) * 16, h[q]);
    }
}

/* The same on AVX2, 8 rows a vector: a lane whose weight is 0 adds +0.0, which changes nothing,
 * as a fold that starts at +0.0 never holds -0.0 (x + y is -0.0 only when both are -0.0). */
__attribute__((target("avx2")))
static void fold_lanes_avx2(const ternary_lanes *l, int64_t cols, const float *x, float *out) {
    const __m256i bits = _mm256_setr_epi32(1, 2, 4, 8, 16, 32, 64, 128);
    for (int64_t k0 = 0; k0 < l->blocks; k0 += 4) { /* 4 blocks of 16 = 8 vectors of 8 */
        const int nk = l->blocks - k0 < 4 ? (int)(l->blocks - k0) : 4;
        __m256 h[8];
        for (int q = 0; q < 8; q++) h[q] = _mm256_setzero_ps();
        for (int64_t phase = 0; phase < 2; phase++) {
            const uint16_t *m = l->lanes + phase * cols * l->blocks + k0;
            for (int64_t i = 0; i < cols; i++, m += l->blocks) {
                const __m256 v = _mm256_set1_ps(x[i]);
                for (int q = 0; q < 2 * nk; q++) {
                    const __m256i sel = _mm256_set1_epi32((m[q / 2] >> (8 * (q % 2))) & 0xff);
                    const __m256 part = _mm256_and_ps(v, _mm256_castsi256_ps(
                        _mm256_cmpeq_epi32(_mm256_and_si256(sel, bits), bits)));
                    h[q] = phase ? _mm256_sub_ps(h[q], part) : _mm256_add_ps(h[q], part);
                }
            }
        }
        for (int q = 0; q < 2 * nk; q++) _mm256_store_ps(out + k0 * 16 + q * 8, h[q]);
    }
}

/* Y[n] for one row x: s = fold(W_b) * a and Y = fold(W_c over s) + bias (relu), a vector of
 * 16 at a time; work holds ceil(R / 16) * 16 + ceil(M / 16) * 16 floats, 64-byte aligned. */
static void row_lanes(const spn_plan *p, int avx512, const float *x, float *y, float *work) {
    float *s = work, *acc = work + p->bl.blocks * 16;
    (avx512 ? fold_lanes_avx512 : fold_lanes_avx2)(&p->bl, p->D, x, s);
    for (int64_t j = 0; j < p->bl.blocks * 16; j++) s[j] = s[j] * p->a[j]; /* padding: 0 * 0 */
    (avx512 ? fold_lanes_avx512 : fold_lanes_avx2)(&p->cl, p->R, s, acc);
    for (int64_t m = 0; m < p->M; m++) {
        const float v = acc[m] + p->bias[m];
        y[m] = p->relu ? (v > 0.0f ? v : 0.0f) : v;
    }
}

int spn_apply(const spn_plan *p, const float *X, int64_t N, float *Y, int path, char *err, size_t errlen) {
    if (!p) return set_err(err, errlen, LUT_EINVAL, "spn_apply: plan is NULL");
    const int rp = lut_resolve_path(path, err, errlen);
    if (rp < 0) return -rp;
    if (N < 0) return set_err(err, errlen, LUT_EINVAL, "spn_apply: N must be >= 0, got %lld", (long long)N);
    if (N == 0) return LUT_OK;
    if (!X || !Y) return set_err(err, errlen, LUT_EINVAL, "spn_apply: NULL data pointer");
    const int G = rp == LUT_PATH_AVX512 ? 16 : rp == LUT_PATH_AVX2 ? 8 : 1;
    const int by_row = G > 1 && N <= ROW_PATH_MAX_N && p->bl.lanes && p->cl.lanes;
    /* (D + R + M) * G floats, or the padded R + M of the row path; D, R, M < 2^31 */
    const size_t floats = by_row ? (size_t)(p->bl.blocks + p->cl.blocks) * 16 : (size_t)(p->D + p->R + p->M) * (size_t)G;
    float *work = (float *)aligned_alloc(64, (sizeof(float) * floats + 63) & ~(size_t)63);
    if (!work) return set_err(err, errlen, LUT_ENOMEM, "spn_apply: out of memory (%zu floats)", floats);
    if (by_row) {
        for (int64_t n = 0; n < N; n++) row_lanes(p, G == 16, X + n * p->D, Y + n * p->M, work);
    } else if (G == 1) {
        rows_scalar(p, X, N, Y, work);
    } else {
        float *xt = work, *st = xt + p->D * G, *yt = st + p->R * G;
        for (int64_t n0 = 0; n0 < N; n0 += G) {
            const int g = N - n0 < G ? (int)(N - n0) : G;
            transpose_rows(X + n0 * p->D, p->D, g, G, xt);
            if (G == 16)
                group_avx512(p, xt, st, yt);
            else
                group_avx2(p, xt, st, yt);
            untranspose_rows(yt, p->M, g, G, Y + n0 * p->M);
        }
    }
    free(work);
    return LUT_OK;
}
