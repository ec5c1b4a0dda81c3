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

/* One ternary matrix of `rows` rows over `cols` inputs as int8 for the uint8 path (activations
 * = 1): blocks of 16 rows, and in a block each group of 4 inputs one 64-byte vector, row by row:
 * w[((k * groups + g) * 16 + u) * 4 + i] is the weight of row 16k + u at input 4g + i (0 past
 * the matrix), the operand layout of vpdpbusd (and of two 32-byte halves for AVX2's maddubs);
 * sums[j] = float(sum of row j's weights) for the dequantisation, 0 past `rows`. */
typedef struct {
    int64_t rows, groups, blocks; /* groups = ceil(cols / 4), blocks = ceil(rows / 16) */
    int8_t *w;                    /* 64-byte aligned */
    float *sums;                  /* blocks * 16 */
} ternary_i8;

struct spn_plan {
    int64_t D, M, R;
    int relu;
    int activations; /* 0: float32 folds (b, c, bl, cl); 1: uint8 activations (qb, qc) */
    ternary_rows b, c; /* W_b: R rows over D inputs; W_c: M rows over R hidden units */
    ternary_lanes bl, cl; /* the same by input; lanes NULL when they would exceed LANES_MAX bytes */
    ternary_i8 qb, qc;    /* W_b and W_c as int8 */
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
    free(p->qb.w);
    free(p->qb.sums);
    free(p->qc.w);
    free(p->qc.sums);
    free(p->a);
    free(p->bias);
    free(p);
}

/* The weight (code 0, 1 = +1 or 2 = -1) at row r, input i of a packed matrix of `stride` bytes a row. */
static unsigned code_at(const uint8_t *packed, int64_t stride, int64_t r, int64_t i) {
    return (packed[r * stride + i / 4] >> (2 * (i % 4))) & 3u;
}

/* A packed rows x cols matrix (spn_packed_bytes of it, checked by the caller) holds no code 3 and
 * no weight past a row's end; *nonzero counts its weights. */
static int check_packed(const char *name, const uint8_t *packed, int64_t rows, int64_t cols, int64_t *nonzero,
                        char *err, size_t errlen) {
    const int64_t stride = (cols + 3) / 4;
    *nonzero = 0;
    for (int64_t r = 0; r < rows; r++)
        for (int64_t i = 0; i < stride * 4; i++) {
            const unsigned code = code_at(packed, stride, r, i);
            if (code == 3)
                return set_err(err, errlen, LUT_EINVAL, "attribute '%s': row %lld, entry %lld holds code 3 "
                            "(only 0, 1 = +1 and 2 = -1 are weights)", name, (long long)r, (long long)i);
            if (code && i >= cols)
                return set_err(err, errlen, LUT_EINVAL, "attribute '%s': row %lld has a weight past its %lld "
                            "entries (the last byte's unused bits must be 0)", name, (long long)r, (long long)cols);
            *nonzero += code != 0;
        }
    return LUT_OK;
}

/* Unpack a rows x cols matrix (spn_packed_bytes of it, checked by the caller) into index lists. */
static int unpack(ternary_rows *t, const char *name, const uint8_t *packed, int64_t rows, int64_t cols,
                  char *err, size_t errlen) {
    const int64_t stride = (cols + 3) / 4;
    int64_t nonzero = 0;
    const int rc = check_packed(name, packed, rows, cols, &nonzero, err, errlen);
    if (rc != LUT_OK) return rc;
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
                if (code_at(packed, stride, r, i) == want) t->idx[k++] = (int32_t)i;
        }
    }
    t->start[rows] = k;
    return LUT_OK;
}

/* A packed rows x cols matrix (checked as unpack's) as int8 in ternary_i8's layout, with its row sums. */
static int to_int8(ternary_i8 *t, const char *name, const uint8_t *packed, int64_t rows, int64_t cols, char *err,
                   size_t errlen) {
    const int64_t stride = (cols + 3) / 4;
    int64_t nonzero = 0;
    const int rc = check_packed(name, packed, rows, cols, &nonzero, err, errlen);
    if (rc != LUT_OK) return rc;
    t->rows = rows;
    t->groups = stride;
    t->blocks = (rows + 15) / 16;
    const size_t bytes = (size_t)(t->blocks * t->groups) * 64; /* a multiple of 64 */
    t->w = (int8_t *)aligned_alloc(64, bytes);
    t->sums = (float *)calloc((size_t)t->blocks * 16, sizeof(float));
    if (!t->w || !t->sums) return set_err(err, errlen, LUT_ENOMEM, "out of memory converting '%s'", name);
    memset(t->w, 0, bytes);
    for (int64_t r = 0; r < rows; r++) {
        int8_t *w = t->w + (r / 16) * t->groups * 64 + (r % 16) * 4;
        int32_t sum = 0; /* |sum| <= cols <= 2^23: exact as a float */
        for (int64_t i = 0; i < cols; i++) {
            const unsigned code = code_at(packed, stride, r, i);
            const int8_t v = code == 1 ? 1 : code == 2 ? -1 : 0;
            w[(i / 4) * 64 + i % 4] = v;
            sum += v;
        }
        t->sums[r] = (float)sum;
    }
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
                    int64_t n_bias, int64_t relu, int64_t activations, char *err, size_t errlen) {
    *out = NULL;
    const int64_t most = INT32_MAX;
    if (D < 1 || D > most) return set_err(err, errlen, LUT_EINVAL, "attribute 'D' = %lld out of range [1, 2^31 - 1]", (long long)D);
    if (M < 1 || M > most) return set_err(err, errlen, LUT_EINVAL, "attribute 'M' = %lld out of range [1, 2^31 - 1]", (long long)M);
    if (R < 1 || R > most) return set_err(err, errlen, LUT_EINVAL, "attribute 'R' = %lld out of range [1, 2^31 - 1]", (long long)R);
    if (R > ((int64_t)1 << 36) / (D > M ? D : M))
        return set_err(err, errlen, LUT_EINVAL, "R * max(D, M) = %lld * %lld exceeds 2^36 weights", (long long)R,
                    (long long)(D > M ? D : M));
    if (relu != 0 && relu != 1) return set_err(err, errlen, LUT_EINVAL, "attribute 'relu' must be 0 or 1, got %lld", (long long)relu);
    if (activations != 0 && activations != 1)
        return set_err(err, errlen, LUT_EINVAL, "attribute 'activations' must be 0 (float32) or 1 (uint8), got %lld",
                       (long long)activations);
    if (activations == 1 && (D > SPN_UINT8_MAX_INPUTS || R > SPN_UINT8_MAX_INPUTS))
        return set_err(err, errlen, LUT_EINVAL, "with activations = 1 (uint8), D and R must be at most 2^23, got "
                       "D = %lld, R = %lld", (long long)D, (long long)R);
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
    p->activations = (int)activations;
    int rc = activations ? to_int8(&p->qb, "wb", wb, R, D, err, errlen) : unpack(&p->b, "wb", wb, R, D, err, errlen);
    if (rc == LUT_OK) rc = activations ? to_int8(&p->qc, "wc", wc, M, R, err, errlen) : unpack(&p->c, "wc", wc, M, R, err, errlen);
    if (rc == LUT_OK) rc = copy_finite(&p->a, "a", a, n_a, R, (R + 15) / 16 * 16, err, errlen);
    if (rc == LUT_OK) rc = copy_finite(&p->bias, "bias", bias, n_bias, M, (M + 15) / 16 * 16, err, errlen);
    if (rc != LUT_OK) {
        spn_plan_destroy(p);
        return rc;
    }
    if (!activations) {
        by_input(&p->b, D, &p->bl);
        by_input(&p->c, R, &p->cl);
    }
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

/* ------------------------------------------------------------------------------------ */
/* uint8 activations (activations = 1): Q(v, t) of docs/lutmatmul.md, twice a row          */
/*
 * A call runs blocks of up to U8_ROWS rows: the block's X rows quantised (q1, lo, step), the
 * stage-1 product into s (times a), s quantised (q2), the stage-2 product into Y (plus bias,
 * relu). The integer sums are exact in any order; the float steps are the spec's, in its
 * order: cvtdq2ps and (float) round to nearest even, so do cvtps2dq and nearbyintf under the
 * default rounding mode, and -ffp-contract=off keeps every mul and add unfused. A row holding
 * NaN or inf, or whose max - min overflows, gets step NaN (and lo 0), so that every output
 * step * acc + ... of it is NaN. The SIMD products run register tiles of up to 6 (AVX-512) or
 * 4 (AVX2) rows x NB blocks of 16 outputs over all the input groups, the dequantisation as the
 * tile's epilogue. The AVX-512 path exists only on CPUs with AVX512_VNNI (lut_paths_available),
 * so it always uses vpdpbusd. Scratch (s, q1, q2, lo, step of a block) is allocated per call.
 */
#define U8_ROWS 24 /* 4 tiles of 6 rows; q1 of 24 rows is 20 KB at D = 784 */
#define AVX512_U8 __attribute__((target("avx512f,avx512bw,avx512vl,avx512vnni")))

/* The products' epilogue: y = step * float(acc) + lo * sums[j], then y * mul[j] (stage 1: a),
 * y + add[j] (stage 2: bias) and relu, each when set; mul and add padded to whole blocks. */
typedef struct {
    const float *mul, *add;
    int relu;
} u8_epilogue;

/* quantise the row x[0 .. K) into q[0 .. K), *lo and *step; 0 (q untouched) when its outputs are NaN */
typedef int (*u8_quantize_fn)(const float *x, int64_t K, uint8_t *q, float *lo, float *step);
/* out[r * ldo + j] for j < t->rows: the epilogue of the sums of q's rows times t's rows */
typedef void (*u8_product_fn)(const ternary_i8 *t, int rows, const uint8_t *q, int64_t ldq, const float *lo,
                              const float *step, const u8_epilogue *e, float *out, int64_t ldo);
/* one register tile: mr rows x nb blocks from block b0 (see u8_tiles) */
typedef void (*u8_tile_fn)(int mr, int nb, const ternary_i8 *t, int64_t b0, const uint8_t *q, int64_t ldq,
                           const float *lo, const float *step, const u8_epilogue *e, float *out, int64_t ldo);

/* lo and step of a row of minimum mn and maximum mx (finite: no NaN nor inf in the row); 0 for
 * a row whose outputs are NaN: step NaN, lo 0, and the caller zeroes its q. */
static inline int row_scale(int finite, float mn, float mx, float *lo, float *step) {
    const float span = mx - mn;
    if (!finite || isinf(span)) {
        *lo = 0.0f;
        *step = NAN;
        return 0;
    }
    const float s = span / 255.0f;
    *lo = mn;
    *step = s == 0.0f ? 1.0f : s;
    return 1;
}

/* q of one value v >= lo: rint((v - lo) / step), at most 255 */
static inline uint8_t quantize_one(float v, float lo, float step) {
    const float q = nearbyintf((v - lo) / step);
    return q >= 255.0f ? 255 : (uint8_t)q;
}

static inline int32_t load_u32(const uint8_t *p) {
    int32_t v;
    memcpy(&v, p, sizeof v);
    return v;
}

/* `rows` rows v[r * ldv + k], k < K, quantised into q[r * ldq + k] (zeros from K to ldq, and for a
 * row whose outputs are NaN), lo[r] and step[r] */
static void quantize_rows(u8_quantize_fn quantize, const float *v, int64_t ldv, int rows, int64_t K, uint8_t *q,
                          int64_t ldq, float *lo, float *step) {
    for (int r = 0; r < rows; r++) {
        uint8_t *qr = q + r * ldq;
        memset(qr + K, 0, (size_t)(ldq - K));
        if (!quantize(v + r * ldv, K, qr, lo + r, step + r)) memset(qr, 0, (size_t)K);
    }
}

static int quantize_scalar(const float *x, int64_t K, uint8_t *q, float *lo, float *step) {
    int finite = 1;
    float mn = INFINITY, mx = -INFINITY;
    for (int64_t k = 0; k < K; k++) {
        finite &= isfinite(x[k]) != 0;
        mn = x[k] < mn ? x[k] : mn;
        mx = x[k] > mx ? x[k] : mx;
    }
    if (!row_scale(finite, mn, mx, lo, step)) return 0;
    for (int64_t k = 0; k < K; k++) q[k] = quantize_one(x[k], *lo, *step);
    return 1;
}

static inline float dequantize(int32_t acc, float lo, float step, const ternary_i8 *t, const u8_epilogue *e,
                               int64_t j) {
    float y = step * (float)acc + lo * t->sums[j];
    if (e->mul) y = y * e->mul[j];
    if (e->add) y = y + e->add[j];
    return e->relu ? (y > 0.0f ? y : 0.0f) : y;
}

static void product_scalar(const ternary_i8 *t, int rows, const uint8_t *q, int64_t ldq, const float *lo,
                           const float *step, const u8_epilogue *e, float *out, int64_t ldo) {
    for (int r = 0; r < rows; r++)
        for (int64_t j = 0; j < t->rows; j++) {
            const int8_t *w = t->w + (j / 16) * t->groups * 64 + (j % 16) * 4;
            const uint8_t *x = q + r * ldq;
            int32_t acc = 0;
            for (int64_t g = 0; g < t->groups; g++)
                for (int i = 0; i < 4; i++) acc += x[4 * g + i] * w[64 * g + i];
            out[r * ldo + j] = dequantize(acc, lo[r], step[r], t, e, j);
        }
}

/* The SIMD products: tiles of mr <= mr_max rows x nb <= nb_max blocks, blocks outermost (a
 * chunk of weights serves every row tile of the block in turn). */
static void u8_tiles(u8_tile_fn tile, int mr_max, int nb_max, const ternary_i8 *t, int rows, const uint8_t *q,
                     int64_t ldq, const float *lo, const float *step, const u8_epilogue *e, float *out, int64_t ldo) {
    for (int64_t b0 = 0; b0 < t->blocks; b0 += nb_max) {
        const int nb = t->blocks - b0 < nb_max ? (int)(t->blocks - b0) : nb_max;
        for (int r0 = 0; r0 < rows; r0 += mr_max) {
            const int mr = rows - r0 < mr_max ? rows - r0 : mr_max;
            tile(mr, nb, t, b0, q + r0 * ldq, ldq, lo + r0, step + r0, e, out + r0 * ldo, ldo);
        }
    }
}

/* case labels of a tile dispatch, TILE(mr, nb) each: mr rows x nb = 1 .. NB blocks */
#define U8_NB2(TILE, mr) TILE(mr, 1) TILE(mr, 2)
#define U8_NB4(TILE, mr) U8_NB2(TILE, mr) TILE(mr, 3) TILE(mr, 4)
#define U8_NB8(TILE, mr) U8_NB4(TILE, mr) TILE(mr, 5) TILE(mr, 6) TILE(mr, 7) TILE(mr, 8)
#define U8_TILE_ARGS t, b0, q, ldq, lo, step, e, out, ldo

/* ---- AVX2: 8 outputs a vector, a block's 64-byte group two of them ---------------------- */

#define AVX2_GROUPS 64

__attribute__((target("avx2"))) static inline float hmin_avx2(__m256 v) {
    __m128 m = _mm_min_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    m = _mm_min_ps(m, _mm_movehl_ps(m, m));
    return _mm_cvtss_f32(_mm_min_ss(m, _mm_shuffle_ps(m, m, 1)));
}

__attribute__((target("avx2"))) static inline float hmax_avx2(__m256 v) {
    __m128 m = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    m = _mm_max_ps(m, _mm_movehl_ps(m, m));
    return _mm_cvtss_f32(_mm_max_ss(m, _mm_shuffle_ps(m, m, 1)));
}

__attribute__((target("avx2"))) static inline int hmax_epi32_avx2(__m256i v) {
    __m128i m = _mm_max_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
    m = _mm_max_epi32(m, _mm_shuffle_epi32(m, 0x4e));
    return _mm_cvtsi128_si32(_mm_max_epi32(m, _mm_shuffle_epi32(m, 0xb1)));
}

/* lanes i < n set (n may be <= 0 or >= 8) */
__attribute__((target("avx2"))) static inline __m256i lanes_avx2(int64_t n) {
    return _mm256_cmpgt_epi32(_mm256_set1_epi32((int)(n < 0 ? 0 : n > 8 ? 8 : n)),
                              _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
}

/* min, max and the largest |bits| (>= 0x7f800000: NaN or inf) of x[0 .. K); lanes past K read x[0] */
__attribute__((target("avx2")))
static int row_stats_avx2(const float *x, int64_t K, float *lo, float *step) {
    const __m256 first = _mm256_set1_ps(x[0]);
    const __m256i magnitude = _mm256_set1_epi32(0x7fffffff);
    __m256 mn = first, mx = first;
    __m256i bits = _mm256_setzero_si256();
    for (int64_t k = 0; k < K; k += 8) {
        const __m256i in = lanes_avx2(K - k);
        const __m256 v = K - k >= 8 ? _mm256_loadu_ps(x + k)
                                    : _mm256_blendv_ps(first, _mm256_maskload_ps(x + k, in), _mm256_castsi256_ps(in));
        mn = _mm256_min_ps(mn, v);
        mx = _mm256_max_ps(mx, v);
        bits = _mm256_max_epi32(bits, _mm256_and_si256(_mm256_castps_si256(v), magnitude));
    }
    return row_scale(hmax_epi32_avx2(bits) < 0x7f800000, hmin_avx2(mn), hmax_avx2(mx), lo, step);
}

__attribute__((target("avx2")))
static int quantize_avx2(const float *x, int64_t K, uint8_t *q, float *lo, float *step) {
    if (!row_stats_avx2(x, K, lo, step)) return 0;
    /* packs then packus interleave the four vectors' dwords 0, 4, 1, 5, 2, 6, 3, 7 */
    const __m256i order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
    const __m256 vlo = _mm256_set1_ps(*lo), vstep = _mm256_set1_ps(*step);
    for (int64_t k = 0; k < K; k += 32) {
        __m256i c[4]; /* values in [0, 383]: packs and packus saturate to [0, 255] */
        for (int u = 0; u < 4; u++) {
            const int64_t at = k + 8 * u;
            const __m256 xv = K - at >= 8 ? _mm256_loadu_ps(x + at) : _mm256_maskload_ps(x + at, lanes_avx2(K - at));
            c[u] = _mm256_cvtps_epi32(_mm256_div_ps(_mm256_sub_ps(xv, vlo), vstep));
        }
        const __m256i bytes = _mm256_permutevar8x32_epi32(
            _mm256_packus_epi16(_mm256_packs_epi32(c[0], c[1]), _mm256_packs_epi32(c[2], c[3])), order);
        if (K - k >= 32) {
            _mm256_storeu_si256((__m256i *)(q + k), bytes);
        } else {
            uint8_t part[32];
            _mm256_storeu_si256((__m256i *)part, bytes);
            memcpy(q + k, part, (size_t)(K - k));
        }
    }
    return 1;
}

__attribute__((target("avx2"))) static inline __attribute__((always_inline))
void tile_avx2(const int MR, const int NB, const ternary_i8 *t, int64_t b0, const uint8_t *q, int64_t ldq,
               const float *lo, const float *step, const u8_epilogue *e, float *out, int64_t ldo) {
    const __m256i ones = _mm256_set1_epi16(1);
    const int64_t stride = t->groups * 64;
    const int8_t *w = t->w + b0 * stride;
    __m256i acc[4][8];
    for (int r = 0; r < MR; r++)
        for (int h = 0; h < 2 * NB; h++) acc[r][h] = _mm256_setzero_si256();
    /* q * w in [-255, 255], maddubs' pairs in [-510, 510]: no saturation, and the int16 sums
     * of up to AVX2_GROUPS = 64 groups' pairs stay within [-32640, 32640] */
    for (int64_t g0 = 0; g0 < t->groups; g0 += AVX2_GROUPS) {
        const int64_t g1 = t->groups - g0 < AVX2_GROUPS ? t->groups : g0 + AVX2_GROUPS;
        __m256i part[4][8];
        for (int r = 0; r < MR; r++)
            for (int h = 0; h < 2 * NB; h++) part[r][h] = _mm256_setzero_si256();
        for (int64_t g = g0; g < g1; g++) {
            __m256i wv[8];
            for (int h = 0; h < 2 * NB; h++)
                wv[h] = _mm256_load_si256((const __m256i *)(w + (h / 2) * stride + 64 * g + 32 * (h % 2)));
            for (int r = 0; r < MR; r++) {
                const __m256i x = _mm256_set1_epi32(load_u32(q + r * ldq + 4 * g));
                for (int h = 0; h < 2 * NB; h++) part[r][h] = _mm256_add_epi16(part[r][h], _mm256_maddubs_epi16(x, wv[h]));
            }
        }
        for (int r = 0; r < MR; r++)
            for (int h = 0; h < 2 * NB; h++) acc[r][h] = _mm256_add_epi32(acc[r][h], _mm256_madd_epi16(part[r][h], ones));
    }
    for (int h = 0; h < 2 * NB; h++) {
        const int64_t j = b0 * 16 + 8 * h;
        if (j >= t->rows) break;
        const __m256 sums = _mm256_loadu_ps(t->sums + j);
        for (int r = 0; r < MR; r++) {
            __m256 y = _mm256_add_ps(_mm256_mul_ps(_mm256_set1_ps(step[r]), _mm256_cvtepi32_ps(acc[r][h])),
                                     _mm256_mul_ps(_mm256_set1_ps(lo[r]), sums));
            if (e->mul) y = _mm256_mul_ps(y, _mm256_loadu_ps(e->mul + j));
            if (e->add) y = _mm256_add_ps(y, _mm256_loadu_ps(e->add + j));
            if (e->relu) y = _mm256_max_ps(y, _mm256_setzero_ps()); /* y > 0 ? y : +0, NaN -> +0 */
            if (t->rows - j >= 8)
                _mm256_storeu_ps(out + r * ldo + j, y);
            else
                _mm256_maskstore_ps(out + r * ldo + j, lanes_avx2(t->rows - j), y);
        }
    }
}

__attribute__((target("avx2")))
static void tiles_avx2(int mr, int nb, const ternary_i8 *t, int64_t b0, const uint8_t *q, int64_t ldq,
                       const float *lo, const float *step, const u8_epilogue *e, float *out, int64_t ldo) {
#define TILE_AVX2(m, n) case 16 * m + n: tile_avx2(m, n, U8_TILE_ARGS); break;
    switch (16 * mr + nb) {
        U8_NB4(TILE_AVX2, 1) U8_NB2(TILE_AVX2, 2) TILE_AVX2(3, 1) TILE_AVX2(4, 1)
        default: abort();
    }
#undef TILE_AVX2
}

/* 4 rows x 1 block (8 accumulators of the 16 registers), or 2 x 2, 1 x 4 */
static void product_avx2(const ternary_i8 *t, int rows, const uint8_t *q, int64_t ldq, const float *lo,
                         const float *step, const u8_epilogue *e, float *out, int64_t ldo) {
    const int mr = rows >= 3 ? 4 : rows;
    u8_tiles(tiles_avx2, mr, 4 / mr, t, rows, q, ldq, lo, step, e, out, ldo);
}

/* ---- AVX-512: 16 outputs a vector, one 64-byte group each (vpdpbusd) --------------------- */

static inline __mmask16 lanes_avx512(int64_t n) { return n >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << n) - 1); }

/* row_stats_avx2 on 16 lanes */
AVX512_U8
static int row_stats_avx512(const float *x, int64_t K, float *lo, float *step) {
    const __m512 first = _mm512_set1_ps(x[0]);
    const __m512i magnitude = _mm512_set1_epi32(0x7fffffff);
    __m512 mn = first, mx = first;
    __m512i bits = _mm512_setzero_si512();
    for (int64_t k = 0; k < K; k += 16) {
        const __m512 v = _mm512_mask_loadu_ps(first, lanes_avx512(K - k), x + k);
        mn = _mm512_min_ps(mn, v);
        mx = _mm512_max_ps(mx, v);
        bits = _mm512_max_epi32(bits, _mm512_and_si512(_mm512_castps_si512(v), magnitude));
    }
    return row_scale(_mm512_reduce_max_epi32(bits) < 0x7f800000, _mm512_reduce_min_ps(mn), _mm512_reduce_max_ps(mx),
                     lo, step);
}

AVX512_U8
static int quantize_avx512(const float *x, int64_t K, uint8_t *q, float *lo, float *step) {
    if (!row_stats_avx512(x, K, lo, step)) return 0;
    const __m512 vlo = _mm512_set1_ps(*lo), vstep = _mm512_set1_ps(*step);
    for (int64_t k = 0; k < K; k += 16) {
        const __mmask16 in = lanes_avx512(K - k);
        const __m512 xv = _mm512_maskz_loadu_ps(in, x + k);
        /* values in [0, 383]: the unsigned saturation clamps them to 255 */
        const __m512i c = _mm512_cvtps_epi32(_mm512_div_ps(_mm512_sub_ps(xv, vlo), vstep));
        _mm_mask_storeu_epi8(q + k, in, _mm512_cvtusepi32_epi8(c));
    }
    return 1;
}

AVX512_U8 static inline __attribute__((always_inline))
void tile_avx512(const int MR, const int NB, const ternary_i8 *t, int64_t b0, const uint8_t *q, int64_t ldq,
                 const float *lo, const float *step, const u8_epilogue *e, float *out, int64_t ldo) {
    const int64_t stride = t->groups * 64;
    const int8_t *w = t->w + b0 * stride;
    __m512i acc[6][8];
    for (int r = 0; r < MR; r++)
        for (int b = 0; b < NB; b++) acc[r][b] = _mm512_setzero_si512();
    for (int64_t g = 0; g < t->groups; g++) {
        __m512i wv[8];
        for (int b = 0; b < NB; b++) wv[b] = _mm512_load_si512(w + b * stride + 64 * g);
        for (int r = 0; r < MR; r++) {
            const __m512i x = _mm512_set1_epi32(load_u32(q + r * ldq + 4 * g));
            for (int b = 0; b < NB; b++) acc[r][b] = _mm512_dpbusd_epi32(acc[r][b], x, wv[b]);
        }
    }
    for (int b = 0; b < NB; b++) {
        const int64_t j = (b0 + b) * 16;
        const __mmask16 in = lanes_avx512(t->rows - j);
        const __m512 sums = _mm512_loadu_ps(t->sums + j);
        for (int r = 0; r < MR; r++) {
            __m512 y = _mm512_add_ps(_mm512_mul_ps(_mm512_set1_ps(step[r]), _mm512_cvtepi32_ps(acc[r][b])),
                                     _mm512_mul_ps(_mm512_set1_ps(lo[r]), sums));
            if (e->mul) y = _mm512_mul_ps(y, _mm512_loadu_ps(e->mul + j));
            if (e->add) y = _mm512_add_ps(y, _mm512_loadu_ps(e->add + j));
            if (e->relu) y = _mm512_max_ps(y, _mm512_setzero_ps());
            _mm512_mask_storeu_ps(out + r * ldo + j, in, y);
        }
    }
}

AVX512_U8
static void tiles_avx512(int mr, int nb, const ternary_i8 *t, int64_t b0, const uint8_t *q, int64_t ldq,
                         const float *lo, const float *step, const u8_epilogue *e, float *out, int64_t ldo) {
#define TILE_AVX512(m, n) case 16 * m + n: tile_avx512(m, n, U8_TILE_ARGS); break;
    switch (16 * mr + nb) {
        U8_NB8(TILE_AVX512, 1) U8_NB8(TILE_AVX512, 2) U8_NB2(TILE_AVX512, 3) U8_NB2(TILE_AVX512, 4)
        U8_NB2(TILE_AVX512, 5) U8_NB2(TILE_AVX512, 6)
        default: abort();
    }
#undef TILE_AVX512
}

/* 6 rows x 2 blocks (12 accumulators): a 2-block chunk of W_b's weights (2 * 64 bytes an input
 * group: 25 KB at D = 784) stays in L1 while every row tile of the block runs through it, where
 * 4 blocks (50 KB) came from L2 and took a third longer (784 x 200 x 200, 256 rows).  One or two
 * rows (batch 1): 8 blocks, 8 or 16 independent accumulator chains. */
static void product_avx512(const ternary_i8 *t, int rows, const uint8_t *q, int64_t ldq, const float *lo,
                           const float *step, const u8_epilogue *e, float *out, int64_t ldo) {
    const int mr = rows >= 3 ? 6 : rows;
    u8_tiles(tiles_avx512, mr, mr <= 2 ? 8 : 2, t, rows, q, ldq, lo, step, e, out, ldo);
}

/* ---- the driver -------------------------------------------------------------------------- */

static int64_t round64(int64_t n) { return (n + 63) / 64 * 64; }

static int apply_u8(const spn_plan *p, const float *X, int64_t N, float *Y, int rp, char *err, size_t errlen) {
    const u8_quantize_fn quantize = rp == LUT_PATH_AVX512 ? quantize_avx512
                                  : rp == LUT_PATH_AVX2   ? quantize_avx2 : quantize_scalar;
    const u8_product_fn product = rp == LUT_PATH_AVX512 ? product_avx512
                                : rp == LUT_PATH_AVX2   ? product_avx2 : product_scalar;
    const int B = N < U8_ROWS ? (int)N : U8_ROWS;
    /* per row: s (R floats padded to blocks of 16), q1 (D inputs padded to 64), q2 (R), lo, step */
    const int64_t lds = p->qb.blocks * 16, ldq1 = round64(p->qb.groups * 4), ldq2 = round64(p->qc.groups * 4);
    const size_t bytes = (size_t)B * (size_t)(4 * lds + ldq1 + ldq2 + 8);
    uint8_t *work = (uint8_t *)aligned_alloc(64, (bytes + 63) & ~(size_t)63);
    if (!work) return set_err(err, errlen, LUT_ENOMEM, "spn_apply: out of memory (%zu bytes)", bytes);
    float *s = (float *)work;
    uint8_t *q1 = work + B * lds * 4, *q2 = q1 + B * ldq1;
    float *lo = (float *)(q2 + B * ldq2), *step = lo + B;
    const u8_epilogue first = {p->a, NULL, 0}, second = {NULL, p->bias, p->relu};
    for (int64_t n0 = 0; n0 < N; n0 += B) {
        const int rows = N - n0 < B ? (int)(N - n0) : B;
        quantize_rows(quantize, X + n0 * p->D, p->D, rows, p->D, q1, ldq1, lo, step);
        product(&p->qb, rows, q1, ldq1, lo, step, &first, s, lds);
        quantize_rows(quantize, s, lds, rows, p->R, q2, ldq2, lo, step);
        product(&p->qc, rows, q2, ldq2, lo, step, &second, Y + n0 * p->M, p->M);
    }
    free(work);
    return LUT_OK;
}

int spn_apply(const spn_plan *p, const float *X, int64_t N, float *Y, int path, char *err, size_t errlen) {
    if (!p) return set_err(err, errlen, LUT_EINVAL, "spn_apply: plan is NULL");
    const int rp = lut_resolve_path(path, err, errlen);
    if (rp < 0) return -rp;
    if (N < 0) return set_err(err, errlen, LUT_EINVAL, "spn_apply: N must be >= 0, got %lld", (long long)N);
    if (N == 0) return LUT_OK;
    if (!X || !Y) return set_err(err, errlen, LUT_EINVAL, "spn_apply: NULL data pointer");
    if (p->activations) return apply_u8(p, X, N, Y, rp, err, errlen);
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
