/*
 * lutkernel.c: LutMatMul encode + scan, scalar / AVX2 / AVX-512BW paths in one compile.
 *
 * Semantics (docs/lutmatmul.md), per row n, codebook c, output m:
 *   code[n,c] = 4-level tree walk, i = 2*i + (X[n, split[c,l]] > thr[c, 2^l-1+i])
 *   acc[n,m]  = sum_c tables[m, c, code[n,c]]                  (exact integers)
 *   Y[n,m]    = (float)acc * scale + base[m],  base[m] = bias[m] + ((0+off[0])+off[1])+...
 *   relu:       Y = Y > 0 ? Y : 0
 * The float epilogue is written as separate multiply and add; the build uses
 * -ffp-contract=off so no path fuses them.
 *
 * Work is done in blocks of BLOCK = 64 rows.  A block's codes live in a column-major
 * scratch "blk[c*BLOCK + j]" (codebook c, row j of the block), so a SIMD register holds
 * one codebook's codes for 32 (AVX2) or 64 (AVX-512) rows.
 *
 * SIMD scan: tables are repacked at plan creation into groups of MB = 8 outputs:
 * packed[g][c][i][16] = tables[8g+i][c][:] (zero padded past M).  For a group and a
 * codebook, each output's 16-byte table is broadcast to every 128-bit lane and looked up
 * with a byte shuffle (pshufb) for all rows of the register at once.  The looked-up bytes
 * are accumulated exactly in 16-bit lanes with two accumulators per output:
 *   all += v (as 16-bit lanes: even-row byte + 256 * odd-row byte, mod 2^16)
 *   odd += v >> 8 (per 16-bit lane: the odd-row byte)
 * so that odd-row sums = odd and even-row sums = all - (odd << 8) (mod 2^16), exact while a
 * chunk holds at most 257 codebooks (257 * 255 = 65535).  Longer C is split into chunks
 * whose sums are flushed into uint32 accumulators, so any C works.
 * The uint32 sums are kept in "phase" order: 32-bit lane p of phase q holds row 4p+q of
 * the register's rows (q = 0: even & 0xffff, 1: odd & 0xffff, 2: even >> 16,
 * 3: odd >> 16); the epilogue converts to float, applies scale/base/relu, transposes
 * outputs x rows in registers and stores each row's MB (or 4) consecutive outputs.
 */
#include "lutkernel.h"

#include <immintrin.h>
#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define BLOCK 64   /* rows per block */
#define MB 8       /* outputs per packed table group */
#define CHUNK 257  /* codebooks per exact uint16 accumulation chunk */
#define MAX_C (1 << 24)

/* gathers index rows with int32 offsets row*D: keep them in range */
#define AVX2_ENCODE_MAX_D (INT32_MAX / 8)
#define AVX512_ENCODE_MAX_D (INT32_MAX / 16)
/* signed int32 -> float conversion is exact-equivalent while 255 * C < 2^31 */
#define SIGNED_CVT_MAX_C (INT32_MAX / 255)

struct lut_plan {
    int64_t D, M, C;
    int64_t G;        /* ceil(M / MB) */
    int relu;
    float scale;
    int32_t *split;   /* [C][4] */
    float *thr;       /* [C][16]: the 15 heap-ordered thresholds + one zero pad */
    uint8_t *tables;  /* [M][C][16] (scalar path) */
    uint8_t *packed;  /* [G][C][MB][16] (SIMD paths), NULL if none is supported */
    float *base;      /* [G*MB] bias + offset_total, zero padded */
};

/* ------------------------------------------------------------------------------------ */
/* errors, allocation                                                                    */

static int set_err(char *err, size_t errlen, int code, const char *fmt, ...)
    __attribute__((format(printf, 4, 5)));

static int set_err(char *err, size_t errlen, int code, const char *fmt, ...) {
    if (err && errlen) {
        va_list ap;
        va_start(ap, fmt);
        vsnprintf(err, errlen, fmt, ap);
        va_end(ap);
    }
    return code;
}

static void *alloc64(size_t bytes) {
    size_t rounded = (bytes + 63) & ~(size_t)63;
    if (rounded == 0) rounded = 64;
    return aligned_alloc(64, rounded);
}

/* ------------------------------------------------------------------------------------ */
/* path detection and selection                                                          */

static const char *const PATH_NAMES[LUT_NUM_PATHS] = {"scalar", "avx2", "avx512"};

static int detected_paths = -1;

int lut_paths_available(void) {
    int mask = __atomic_load_n(&detected_paths, __ATOMIC_RELAXED);
    if (mask >= 0) return mask;
    __builtin_cpu_init();
    mask = 1 << LUT_PATH_SCALAR;
    if (__builtin_cpu_supports("avx2")) {
        mask |= 1 << LUT_PATH_AVX2;
        if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
            __builtin_cpu_supports("avx512vl"))
            mask |= 1 << LUT_PATH_AVX512;
    }
    __atomic_store_n(&detected_paths, mask, __ATOMIC_RELAXED);
    return mask;
}

const char *lut_path_name(int path) {
    if (path >= 0 && path < LUT_NUM_PATHS) return PATH_NAMES[path];
    if (path == LUT_PATH_AUTO) return "auto";
    return "unknown";
}

static void describe_available(char *buf, size_t len) {
    int mask = lut_paths_available();
    size_t used = 0;
    buf[0] = 0;
    for (int p = 0; p < LUT_NUM_PATHS; p++) {
        if (!(mask & (1 << p))) continue;
        int w = snprintf(buf + used, len - used, "%s%s", used ? ", " : "", PATH_NAMES[p]);
        if (w < 0 || (size_t)w >= len - used) break;
        used += (size_t)w;
    }
}

static int ascii_ieq(const char *a, const char *b) {
    for (; *a && *b; a++, b++) {
        char x = *a, y = *b;
        if (x >= 'A' && x <= 'Z') x = (char)(x - 'A' + 'a');
        if (y >= 'A' && y <= 'Z') y = (char)(y - 'A' + 'a');
        if (x != y) return 0;
    }
    return *a == *b;
}

int lut_resolve_path(int requested, char *err, size_t errlen) {
    int mask = lut_paths_available();
    char avail[64];
    if (requested == LUT_PATH_AUTO) {
        const char *env = getenv("LUTCOMPILE_KERNEL_PATH");
        if (env && env[0] && !ascii_ieq(env, "auto")) {
            int p = -1;
            for (int i = 0; i < LUT_NUM_PATHS; i++)
                if (ascii_ieq(env, PATH_NAMES[i])) p = i;
            if (p < 0)
                return -set_err(err, errlen, LUT_EPATH,
                                "LUTCOMPILE_KERNEL_PATH='%.40s' is not one of scalar, avx2, "
                                "avx512, auto", env);
            if (!(mask & (1 << p))) {
                describe_available(avail, sizeof avail);
                return -set_err(err, errlen, LUT_EPATH,
                                "LUTCOMPILE_KERNEL_PATH=%s: this CPU does not support the %s "
                                "kernel path (available: %s)", PATH_NAMES[p], PATH_NAMES[p], avail);
            }
            return p;
        }
        for (int p = LUT_NUM_PATHS - 1; p >= 0; p--)
            if (mask & (1 << p)) return p;
        return LUT_PATH_SCALAR;
    }
    if (requested < 0 || requested >= LUT_NUM_PATHS)
        return -set_err(err, errlen, LUT_EPATH,
                        "unknown kernel path %d (use -1 auto, 0 scalar, 1 avx2, 2 avx512)",
                        requested);
    if (!(mask & (1 << requested))) {
        describe_available(avail, sizeof avail);
        return -set_err(err, errlen, LUT_EPATH,
                        "kernel path '%s' is not supported on this CPU (available: %s)",
                        PATH_NAMES[requested], avail);
    }
    return requested;
}

/* ------------------------------------------------------------------------------------ */
/* plan                                                                                  */

void lut_plan_destroy(lut_plan *plan) {
    if (!plan) return;
    free(plan->split);
    free(plan->thr);
    free(plan->tables);
    free(plan->packed);
    free(plan->base);
    free(plan);
}

int64_t lut_plan_D(const lut_plan *plan) { return plan ? plan->D : -1; }
int64_t lut_plan_M(const lut_plan *plan) { return plan ? plan->M : -1; }
int64_t lut_plan_C(const lut_plan *plan) { return plan ? plan->C : -1; }

static int plan_build(lut_plan **out, int encoder_only, int64_t D, int64_t M, int64_t C,
                      int64_t K, const int64_t *split_dims, int64_t n_split,
                      const float *thresholds, int64_t n_thresholds, const uint8_t *tables,
                      int64_t n_tables, float scale, const float *offsets, int64_t n_offsets,
                      const float *bias, int64_t n_bias, int64_t relu, char *err,
                      size_t errlen) {
    if (!out) return set_err(err, errlen, LUT_EINVAL, "lut_plan_create: out is NULL");
    *out = NULL;
    if (D < 1 || D > ((int64_t)1 << 40))
        return set_err(err, errlen, LUT_EINVAL, "attribute 'D' must be >= 1, got %lld",
                       (long long)D);
    if (C < 1 || C >= MAX_C)
        return set_err(err, errlen, LUT_EINVAL,
                       "attribute 'C' must satisfy 1 <= C < 2^24, got %lld", (long long)C);
    if (!encoder_only) {
        if (M < 1 || M > ((int64_t)1 << 40))
            return set_err(err, errlen, LUT_EINVAL, "attribute 'M' must be >= 1, got %lld",
                           (long long)M);
        if (K != LUT_K)
            return set_err(err, errlen, LUT_EINVAL, "attribute 'K' must be 16, got %lld",
                           (long long)K);
        if (relu != 0 && relu != 1)
            return set_err(err, errlen, LUT_EINVAL, "attribute 'relu' must be 0 or 1, got %lld",
                           (long long)relu);
        if (!isfinite(scale) || !(scale > 0.0f))
            return set_err(err, errlen, LUT_EINVAL,
                           "attribute 'scale' must be finite and > 0, got %g", (double)scale);
    } else {
        M = 0;
    }
    if (n_split != C * LUT_DEPTH)
        return set_err(err, errlen, LUT_EINVAL,
                       "attribute 'split_dims' must have C*4 = %lld values, got %lld",
                       (long long)(C * LUT_DEPTH), (long long)n_split);
    if (!split_dims)
        return set_err(err, errlen, LUT_EINVAL, "attribute 'split_dims' is missing (NULL)");
    for (int64_t i = 0; i < n_split; i++)
        if (split_dims[i] < 0 || split_dims[i] >= D)
            return set_err(err, errlen, LUT_EINVAL,
                           "attribute 'split_dims' value %lld at index %lld (codebook %lld, "
                           "level %lld) is outside [0, D=%lld)",
                           (long long)split_dims[i], (long long)i, (long long)(i / LUT_DEPTH),
                           (long long)(i % LUT_DEPTH), (long long)D);
    if (n_thresholds != C * LUT_NODES)
        return set_err(err, errlen, LUT_EINVAL,
                       "attribute 'thresholds' must have C*15 = %lld values, got %lld",
                       (long long)(C * LUT_NODES), (long long)n_thresholds);
    if (!thresholds)
        return set_err(err, errlen, LUT_EINVAL, "attribute 'thresholds' is missing (NULL)");
    int64_t G = 0;
    if (!encoder_only) {
        /* M * C * 16 without overflow (M, C < 2^40, 2^24 already; be explicit anyway) */
        if (M + MB > INT64_MAX / (C * LUT_K))
            return set_err(err, errlen, LUT_EINVAL, "attribute 'tables' would be too large");
        if (n_tables != M * C * LUT_K)
            return set_err(err, errlen, LUT_EINVAL,
                           "attribute 'tables' must have M*C*16 = %lld*%lld*16 = %lld bytes "
                           "(shape [M, C, 16]), got %lld",
                           (long long)M, (long long)C, (long long)(M * C * LUT_K),
                           (long long)n_tables);
        if (!tables)
            return set_err(err, errlen, LUT_EINVAL, "attribute 'tables' is missing (NULL)");
        if (n_offsets != C)
            return set_err(err, errlen, LUT_EINVAL,
                           "attribute 'offsets' must have C = %lld values, got %lld",
                           (long long)C, (long long)n_offsets);
        if (!offsets)
            return set_err(err, errlen, LUT_EINVAL, "attribute 'offsets' is missing (NULL)");
        for (int64_t c = 0; c < C; c++)
            if (!isfinite(offsets[c]))
                return set_err(err, errlen, LUT_EINVAL,
                               "attribute 'offsets' value at index %lld is not finite (%g)",
                               (long long)c, (double)offsets[c]);
        if (n_bias != M)
            return set_err(err, errlen, LUT_EINVAL,
                           "attribute 'bias' must have M = %lld values, got %lld",
                           (long long)M, (long long)n_bias);
        if (!bias) return set_err(err, errlen, LUT_EINVAL, "attribute 'bias' is missing (NULL)");
        for (int64_t m = 0; m < M; m++)
            if (!isfinite(bias[m]))
                return set_err(err, errlen, LUT_EINVAL,
                               "attribute 'bias' value at index %lld is not finite (%g)",
                               (long long)m, (double)bias[m]);
        G = (M + MB - 1) / MB;
    }

    lut_plan *p = (lut_plan *)calloc(1, sizeof *p);
    if (!p) return set_err(err, errlen, LUT_ENOMEM, "out of memory creating the LutMatMul plan");
    p->D = D;
    p->M = M;
    p->C = C;
    p->G = G;
    p->relu = (int)relu;
    p->scale = encoder_only ? 1.0f : scale;
    p->split = (int32_t *)alloc64((size_t)C * LUT_DEPTH * sizeof(int32_t));
    p->thr = (float *)alloc64((size_t)C * 16 * sizeof(float));
    if (!p->split || !p->thr) goto oom;
    for (int64_t i = 0; i < C * LUT_DEPTH; i++) p->split[i] = (int32_t)split_dims[i];
    for (int64_t c = 0; c < C; c++) {
        memcpy(p->thr + c * 16, thresholds + c * LUT_NODES, LUT_NODES * sizeof(float));
        p->thr[c * 16 + 15] = 0.0f;
    }
    if (!encoder_only) {
        size_t tbytes = (size_t)M * (size_t)C * LUT_K;
        p->tables = (uint8_t *)alloc64(tbytes);
        p->base = (float *)alloc64((size_t)G * MB * sizeof(float));
        if (!p->tables || !p->base) goto oom;
        memcpy(p->tables, tables, tbytes);
        float offset_total = 0.0f;
        for (int64_t c = 0; c < C; c++) offset_total = offset_total + offsets[c];
        for (int64_t m = 0; m < G * MB; m++) p->base[m] = m < M ? bias[m] + offset_total : 0.0f;
        if (lut_paths_available() & ((1 << LUT_PATH_AVX2) | (1 << LUT_PATH_AVX512))) {
            size_t pbytes = (size_t)G * (size_t)C * MB * LUT_K;
            p->packed = (uint8_t *)alloc64(pbytes);
            if (!p->packed) goto oom;
            memset(p->packed, 0, pbytes);
            for (int64_t m = 0; m < M; m++) {
                int64_t g = m / MB, i = m % MB;
                for (int64_t c = 0; c < C; c++)
                    memcpy(p->packed + ((g * C + c) * MB + i) * LUT_K,
                           p->tables + (m * C + c) * LUT_K, LUT_K);
            }
        }
    }
    *out = p;
    return LUT_OK;
oom:
    lut_plan_destroy(p);
    return set_err(err, errlen, LUT_ENOMEM, "out of memory creating the LutMatMul plan");
}

int lut_plan_create(lut_plan **out, int64_t D, int64_t M, int64_t C, int64_t K,
                    const int64_t *split_dims, int64_t n_split, const float *thresholds,
                    int64_t n_thresholds, const uint8_t *tables, int64_t n_tables, float scale,
                    const float *offsets, int64_t n_offsets, const float *bias, int64_t n_bias,
                    int64_t relu, char *err, size_t errlen) {
    return plan_build(out, 0, D, M, C, K, split_dims, n_split, thresholds, n_thresholds,
                      tables, n_tables, scale, offsets, n_offsets, bias, n_bias, relu, err,
                      errlen);
}

int lut_encoder_create(lut_plan **out, int64_t D, int64_t C, const int64_t *split_dims,
                       int64_t n_split, const float *thresholds, int64_t n_thresholds,
                       char *err, size_t errlen) {
    return plan_build(out, 1, D, 0, C, LUT_K, split_dims, n_split, thresholds, n_thresholds,
                      NULL, 0, 1.0f, NULL, 0, NULL, 0, 0, err, errlen);
}

/* ------------------------------------------------------------------------------------ */
/* scalar path                                                                           */

/* blk[c*BLOCK + j] = code of row j (X points at the block's first row); rows..63 zeroed */
static void encode_block_scalar(const lut_plan *p, const float *X, int rows, uint8_t *blk) {
    const int64_t D = p->D, C = p->C;
    for (int64_t c = 0; c < C; c++) {
        const int32_t *sd = p->split + c * LUT_DEPTH;
        const float *th = p->thr + c * 16;
        uint8_t *dst = blk + c * BLOCK;
        for (int j = 0; j < rows; j++) {
            const float *x = X + (int64_t)j * D;
            unsigned i = 0;
            for (int l = 0; l < LUT_DEPTH; l++) {
                float v = x[sd[l]];
                float t = th[(1u << l) - 1u + i];
                i = 2u * i + (v > t ? 1u : 0u);
            }
            dst[j] = (uint8_t)i;
        }
        for (int j = rows; j < BLOCK; j++) dst[j] = 0;
    }
}

/* Y points at the block's first output row */
static void scan_block_scalar(const lut_plan *p, const uint8_t *blk, int rows, float *Y,
                              uint32_t *scratch) {
    (void)scratch;
    const int64_t M = p->M, C = p->C;
    const float scale = p->scale;
    for (int j = 0; j < rows; j++) {
        float *y = Y + (int64_t)j * M;
        for (int64_t m = 0; m < M; m++) {
            const uint8_t *t = p->tables + m * C * LUT_K;
            uint32_t acc = 0;
            for (int64_t c = 0; c < C; c++) acc += t[c * LUT_K + blk[c * BLOCK + j]];
            float v = (float)acc * scale + p->base[m];
            if (p->relu) v = v > 0.0f ? v : 0.0f;
            y[m] = v;
        }
    }
}

/* ------------------------------------------------------------------------------------ */
/* AVX2 path                                                                             */

#define AVX2_TARGET __attribute__((target("avx2")))

AVX2_TARGET
static void encode_block_avx2(const lut_plan *p, const float *X, int rows, uint8_t *blk) {
    const int64_t D = p->D, C = p->C;
    const __m256i lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
    const __m256i vidx = _mm256_mullo_epi32(lane, _mm256_set1_epi32((int)D));
    const __m256i seven = _mm256_set1_epi32(7);
    for (int r0 = 0; r0 < BLOCK; r0 += 8) {
        if (r0 >= rows) {
            for (int64_t c = 0; c < C; c++) memset(blk + c * BLOCK + r0, 0, 8);
            continue;
        }
        const int valid = rows - r0 < 8 ? rows - r0 : 8;
        const __m256 mask = _mm256_castsi256_ps(_mm256_cmpgt_epi32(_mm256_set1_epi32(valid), lane));
        const float *xg = X + (int64_t)r0 * D;
        for (int64_t c = 0; c < C; c++) {
            const int32_t *sd = p->split + c * LUT_DEPTH;
            const __m256 tlo = _mm256_loadu_ps(p->thr + c * 16);
            const __m256 thi = _mm256_loadu_ps(p->thr + c * 16 + 8);
            __m256i node = _mm256_setzero_si256();
            for (int l = 0; l < LUT_DEPTH; l++) {
                __m256 v = _mm256_mask_i32gather_ps(_mm256_setzero_ps(), xg + sd[l], vidx, mask, 4);
                __m256i idx = _mm256_add_epi32(node, _mm256_set1_epi32((1 << l) - 1));
                __m256 t = _mm256_permutevar8x32_ps(tlo, idx);
                if (l == LUT_DEPTH - 1) { /* heap indices 7..14 straddle the two halves */
                    __m256 t2 = _mm256_permutevar8x32_ps(thi, idx);
                    t = _mm256_blendv_ps(t, t2, _mm256_castsi256_ps(_mm256_cmpgt_epi32(idx, seven)));
                }
                __m256 gt = _mm256_cmp_ps(v, t, _CMP_GT_OQ); /* NaN compares false */
                node = _mm256_sub_epi32(_mm256_add_epi32(node, node), _mm256_castps_si256(gt));
            }
            __m128i w = _mm_packus_epi32(_mm256_castsi256_si128(node), _mm256_extracti128_si256(node, 1));
            w = _mm_packus_epi16(w, w);
            _mm_storel_epi64((__m128i *)(blk + c * BLOCK + r0), w);
        }
    }
}

/* uint32 lanes -> float, correctly rounded for the full uint32 range */
AVX2_TARGET
static inline __m256 u32_to_ps_avx2(__m256i a, int small) {
    if (small) return _mm256_cvtepi32_ps(a);
    __m256 hi = _mm256_cvtepi32_ps(_mm256_srli_epi32(a, 16));
    __m256 lo = _mm256_cvtepi32_ps(_mm256_and_si256(a, _mm256_set1_epi32(0xffff)));
    /* hi * 65536 is exact; the single add rounds once */
    return _mm256_add_ps(_mm256_mul_ps(hi, _mm256_set1_ps(65536.0f)), lo);
}

/* 4 outputs x 32 rows per pass; acc32 holds [4 outputs][4 phases][8 lanes] */
AVX2_TARGET
static void scan_block_avx2(const lut_plan *p, const uint8_t *blk, int rows, float *Y,
                            uint32_t *acc32) {
    const int64_t M = p->M, C = p->C, G = p->G;
    const __m256 vscale = _mm256_set1_ps(p->scale);
    const __m256 zero = _mm256_setzero_ps();
    const __m256i lo16 = _mm256_set1_epi32(0xffff);
    const int small = C <= SIGNED_CVT_MAX_C;
    const int relu = p->relu;
    for (int r0 = 0; r0 < rows; r0 += 32) {
        const int hrows = rows - r0 < 32 ? rows - r0 : 32;
        for (int64_t g = 0; g < G; g++) {
            for (int s = 0; s < 2; s++) {
                const int64_t m0 = g * MB + s * 4;
                if (m0 >= M) break;
                const int mb = M - m0 < 4 ? (int)(M - m0) : 4;
                const uint8_t *tg = p->packed + g * C * MB * LUT_K + s * 4 * LUT_K;
                for (int64_t c0 = 0; c0 < C; c0 += CHUNK) {
                    const int64_t c1 = C - c0 < CHUNK ? C : c0 + CHUNK;
                    __m256i aa0 = _mm256_setzero_si256(), aa1 = aa0, aa2 = aa0, aa3 = aa0;
                    __m256i ao0 = aa0, ao1 = aa0, ao2 = aa0, ao3 = aa0;
                    for (int64_t c = c0; c < c1; c++) {
                        const __m256i codes = _mm256_loadu_si256((const __m256i *)(blk + c * BLOCK + r0));
                        const uint8_t *t = tg + c * MB * LUT_K;
                        __m256i v;
#define AVX2_STEP(i, aa, ao)                                                                      \
    v = _mm256_shuffle_epi8(_mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i *)(t + 16 * (i)))), codes); \
    ao = _mm256_add_epi16(ao, _mm256_srli_epi16(v, 8));                                           \
    aa = _mm256_add_epi16(aa, v);
                        AVX2_STEP(0, aa0, ao0)
                        AVX2_STEP(1, aa1, ao1)
                        AVX2_STEP(2, aa2, ao2)
                        AVX2_STEP(3, aa3, ao3)
#undef AVX2_STEP
                    }
                    __m256i aas[4] = {aa0, aa1, aa2, aa3}, aos[4] = {ao0, ao1, ao2, ao3};
                    for (int i = 0; i < 4; i++) {
                        const __m256i even = _mm256_sub_epi16(aas[i], _mm256_slli_epi16(aos[i], 8));
                        __m256i ph[4];
                        ph[0] = _mm256_and_si256(even, lo16);
                        ph[1] = _mm256_and_si256(aos[i], lo16);
                        ph[2] = _mm256_srli_epi32(even, 16);
                        ph[3] = _mm256_srli_epi32(aos[i], 16);
                        for (int q = 0; q < 4; q++) {
                            __m256i *dst = (__m256i *)(acc32 + (i * 4 + q) * 8);
                            if (c0 == 0)
                                _mm256_store_si256(dst, ph[q]);
                            else
                                _mm256_store_si256(dst, _mm256_add_epi32(_mm256_load_si256(dst), ph[q]));
                        }
                    }
                }
                /* epilogue: float, transpose 4 outputs x 8 lanes per phase, store rows */
                const __m128i smask = _mm_setr_epi32(mb > 0 ? -1 : 0, mb > 1 ? -1 : 0,
                                                     mb > 2 ? -1 : 0, mb > 3 ? -1 : 0);
                for (int q = 0; q < 4; q++) {
                    __m256 f[4];
                    for (int i = 0; i < 4; i++) {
                        __m256i a = _mm256_load_si256((const __m256i *)(acc32 + (i * 4 + q) * 8));
                        __m256 y = _mm256_mul_ps(u32_to_ps_avx2(a, small), vscale);
                        y = _mm256_add_ps(y, _mm256_set1_ps(p->base[m0 + i]));
                        if (relu) y = _mm256_max_ps(y, zero); /* y > 0 ? y : +0 (NaN -> 0) */
                        f[i] = y;
                    }
                    const __m256 t0 = _mm256_unpacklo_ps(f[0], f[1]), t1 = _mm256_unpackhi_ps(f[0], f[1]);
                    const __m256 t2 = _mm256_unpacklo_ps(f[2], f[3]), t3 = _mm256_unpackhi_ps(f[2], f[3]);
                    __m256 sv[4];
                    sv[0] = _mm256_shuffle_ps(t0, t2, 0x44); /* lane p = 4L + 0 */
                    sv[1] = _mm256_shuffle_ps(t0, t2, 0xEE); /* 4L + 1 */
                    sv[2] = _mm256_shuffle_ps(t1, t3, 0x44); /* 4L + 2 */
                    sv[3] = _mm256_shuffle_ps(t1, t3, 0xEE); /* 4L + 3 */
                    for (int k = 0; k < 4; k++) {
                        for (int half = 0; half < 2; half++) {
                            const int lanep = 4 * half + k;
                            const int r = 4 * lanep + q;
                            if (r >= hrows) continue;
                            const __m128 row = half ? _mm256_extractf128_ps(sv[k], 1) : _mm256_castps256_ps128(sv[k]);
                            float *dst = Y + (int64_t)(r0 + r) * M + m0;
                            if (mb == 4)
                                _mm_storeu_ps(dst, row);
                            else
                                _mm_maskstore_ps(dst, smask, row);
                        }
                    }
                }
            }
        }
    }
}

/* ------------------------------------------------------------------------------------ */
/* AVX-512 path                                                                          */

#define AVX512_TARGET __attribute__((target("avx2,avx512f,avx512bw,avx512vl")))

AVX512_TARGET
static void encode_block_avx512(const lut_plan *p, const float *X, int rows, uint8_t *blk) {
    const int64_t D = p->D, C = p->C;
    const __m512i lane = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
    const __m512i vidx = _mm512_mullo_epi32(lane, _mm512_set1_epi32((int)D));
    const __m512i one = _mm512_set1_epi32(1);
    for (int r0 = 0; r0 < BLOCK; r0 += 16) {
        if (r0 >= rows) {
            for (int64_t c = 0; c < C; c++) memset(blk + c * BLOCK + r0, 0, 16);
            continue;
        }
        const int valid = rows - r0 < 16 ? rows - r0 : 16;
        const __mmask16 k = (__mmask16)(valid == 16 ? 0xffffu : ((1u << valid) - 1u));
        const float *xg = X + (int64_t)r0 * D;
        for (int64_t c = 0; c < C; c++) {
            const int32_t *sd = p->split + c * LUT_DEPTH;
            const __m512 th = _mm512_loadu_ps(p->thr + c * 16);
            __m512i node = _mm512_setzero_si512();
            for (int l = 0; l < LUT_DEPTH; l++) {
                __m512 v = _mm512_mask_i32gather_ps(_mm512_setzero_ps(), k, vidx, xg + sd[l], 4);
                __m512 t = _mm512_permutexvar_ps(_mm512_add_epi32(node, _mm512_set1_epi32((1 << l) - 1)), th);
                __mmask16 gt = _mm512_cmp_ps_mask(v, t, _CMP_GT_OQ); /* NaN compares false */
                node = _mm512_add_epi32(node, node);
                node = _mm512_mask_add_epi32(node, gt, node, one);
            }
            _mm_storeu_si128((__m128i *)(blk + c * BLOCK + r0), _mm512_cvtepi32_epi8(node));
        }
    }
}

/* 8 outputs x 64 rows per pass; acc32 holds [8 outputs][4 phases][16 lanes] */
AVX512_TARGET
static void scan_block_avx512(const lut_plan *p, const uint8_t *blk, int rows, float *Y,
                              uint32_t *acc32) {
    const int64_t M = p->M, C = p->C, G = p->G;
    const __m512 vscale = _mm512_set1_ps(p->scale);
    const __m512 zero = _mm512_setzero_ps();
    const __m512i lo16 = _mm512_set1_epi32(0xffff);
    /* rows p = k / 4+k (from s_k lanes 0,1) and 8+k / 12+k (lanes 2,3) */
    const __m512i idx_a = _mm512_setr_epi32(0, 1, 2, 3, 16, 17, 18, 19, 4, 5, 6, 7, 20, 21, 22, 23);
    const __m512i idx_b = _mm512_setr_epi32(8, 9, 10, 11, 24, 25, 26, 27, 12, 13, 14, 15, 28, 29, 30, 31);
    const int relu = p->relu;
    for (int64_t g = 0; g < G; g++) {
        const int64_t m0 = g * MB;
        const int mb = M - m0 < MB ? (int)(M - m0) : MB;
        const __mmask8 smask = (__mmask8)((1u << mb) - 1u);
        const uint8_t *tg = p->packed + g * C * MB * LUT_K;
        for (int64_t c0 = 0; c0 < C; c0 += CHUNK) {
            const int64_t c1 = C - c0 < CHUNK ? C : c0 + CHUNK;
            __m512i aa[MB], ao[MB];
#pragma GCC unroll 8
            for (int i = 0; i < MB; i++) aa[i] = ao[i] = _mm512_setzero_si512();
            for (int64_t c = c0; c < c1; c++) {
                const __m512i codes = _mm512_loadu_si512((const void *)(blk + c * BLOCK));
                const uint8_t *t = tg + c * MB * LUT_K;
#pragma GCC unroll 8
                for (int i = 0; i < MB; i++) {
                    const __m512i tab = _mm512_broadcast_i32x4(_mm_loadu_si128((const __m128i *)(t + 16 * i)));
                    const __m512i v = _mm512_shuffle_epi8(tab, codes);
                    ao[i] = _mm512_add_epi16(ao[i], _mm512_srli_epi16(v, 8));
                    aa[i] = _mm512_add_epi16(aa[i], v);
                }
            }
#pragma GCC unroll 8
            for (int i = 0; i < MB; i++) {
                const __m512i even = _mm512_sub_epi16(aa[i], _mm512_slli_epi16(ao[i], 8));
                __m512i ph[4];
                ph[0] = _mm512_and_si512(even, lo16);
                ph[1] = _mm512_and_si512(ao[i], lo16);
                ph[2] = _mm512_srli_epi32(even, 16);
                ph[3] = _mm512_srli_epi32(ao[i], 16);
                for (int q = 0; q < 4; q++) {
                    uint32_t *dst = acc32 + (i * 4 + q) * 16;
                    if (c0 == 0)
                        _mm512_store_si512((void *)dst, ph[q]);
                    else
                        _mm512_store_si512((void *)dst, _mm512_add_epi32(_mm512_load_si512((const void *)dst), ph[q]));
                }
            }
        }
        /* epilogue: float, transpose 8 outputs x 16 lanes per phase, store rows */
        for (int q = 0; q < 4; q++) {
            __m512 f[MB];
#pragma GCC unroll 8
            for (int i = 0; i < MB; i++) {
                const __m512i a = _mm512_load_si512((const void *)(acc32 + (i * 4 + q) * 16));
                __m512 y = _mm512_mul_ps(_mm512_cvtepu32_ps(a), vscale);
                y = _mm512_add_ps(y, _mm512_set1_ps(p->base[m0 + i]));
                if (relu) y = _mm512_max_ps(y, zero); /* y > 0 ? y : +0 (NaN -> 0) */
                f[i] = y;
            }
            __m512 sv[8];
            for (int h = 0; h < 2; h++) {
                const __m512 t0 = _mm512_unpacklo_ps(f[4 * h + 0], f[4 * h + 1]);
                const __m512 t1 = _mm512_unpackhi_ps(f[4 * h + 0], f[4 * h + 1]);
                const __m512 t2 = _mm512_unpacklo_ps(f[4 * h + 2], f[4 * h + 3]);
                const __m512 t3 = _mm512_unpackhi_ps(f[4 * h + 2], f[4 * h + 3]);
                sv[4 * h + 0] = _mm512_shuffle_ps(t0, t2, 0x44); /* lane p = 4L + 0 */
                sv[4 * h + 1] = _mm512_shuffle_ps(t0, t2, 0xEE); /* 4L + 1 */
                sv[4 * h + 2] = _mm512_shuffle_ps(t1, t3, 0x44); /* 4L + 2 */
                sv[4 * h + 3] = _mm512_shuffle_ps(t1, t3, 0xEE); /* 4L + 3 */
            }
            for (int k = 0; k < 4; k++) {
                const __m512 za = _mm512_permutex2var_ps(sv[k], idx_a, sv[k + 4]);
                const __m512 zb = _mm512_permutex2var_ps(sv[k], idx_b, sv[k + 4]);
                __m256 rowv[4];
                rowv[0] = _mm512_castps512_ps256(za);                                        /* p = k */
                rowv[1] = _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(za), 1)); /* 4 + k */
                rowv[2] = _mm512_castps512_ps256(zb);                                        /* 8 + k */
                rowv[3] = _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(zb), 1)); /* 12 + k */
                for (int u = 0; u < 4; u++) {
                    const int r = 4 * (4 * u + k) + q;
                    if (r >= rows) continue;
                    float *dst = Y + (int64_t)r * M + m0;
                    if (mb == MB)
                        _mm256_storeu_ps(dst, rowv[u]);
                    else
                        _mm256_mask_storeu_ps(dst, smask, rowv[u]);
                }
            }
        }
    }
}

/* ------------------------------------------------------------------------------------ */
/* drivers                                                                               */

typedef void (*encode_block_fn)(const lut_plan *, const float *, int, uint8_t *);
typedef void (*scan_block_fn)(const lut_plan *, const uint8_t *, int, float *, uint32_t *);

static encode_block_fn pick_encode(const lut_plan *p, int path) {
    if (path == LUT_PATH_AVX512 && p->D <= AVX512_ENCODE_MAX_D) return encode_block_avx512;
    if ((path == LUT_PATH_AVX512 || path == LUT_PATH_AVX2) && p->D <= AVX2_ENCODE_MAX_D)
        return encode_block_avx2;
    return encode_block_scalar;
}

static scan_block_fn pick_scan(const lut_plan *p, int path) {
    if (p->packed && path == LUT_PATH_AVX512) return scan_block_avx512;
    if (p->packed && path == LUT_PATH_AVX2) return scan_block_avx2;
    return scan_block_scalar;
}

enum { MODE_ENCODE, MODE_SCAN, MODE_APPLY };

static int run_blocks(int mode, const lut_plan *p, const float *X, const uint8_t *codes_in,
                      int64_t N, uint8_t *codes_out, float *Y, int path, char *err,
                      size_t errlen) {
    static const char *const names[] = {"lut_encode", "lut_scan", "lut_apply"};
    const char *fn = names[mode];
    if (!p) return set_err(err, errlen, LUT_EINVAL, "%s: plan is NULL", fn);
    const int rp = lut_resolve_path(path, err, errlen);
    if (rp < 0) return -rp;
    if (N < 0) return set_err(err, errlen, LUT_EINVAL, "%s: N must be >= 0, got %lld", fn, (long long)N);
    if (mode != MODE_ENCODE && p->M == 0)
        return set_err(err, errlen, LUT_EINVAL, "%s: this plan is encode-only (no tables)", fn);
    if (N == 0) return LUT_OK;
    if ((mode == MODE_SCAN ? (const void *)codes_in : (const void *)X) == NULL ||
        (mode == MODE_ENCODE ? (void *)codes_out : (void *)Y) == NULL)
        return set_err(err, errlen, LUT_EINVAL, "%s: NULL data pointer", fn);

    const int64_t D = p->D, M = p->M, C = p->C;
    const encode_block_fn enc = pick_encode(p, rp);
    const scan_block_fn scan = pick_scan(p, rp);
    _Alignas(64) uint8_t stack_blk[16384];
    _Alignas(64) uint32_t acc32[MB * 4 * 16];
    uint8_t *blk = stack_blk;
    const size_t blk_bytes = (size_t)C * BLOCK;
    if (blk_bytes > sizeof stack_blk) {
        blk = (uint8_t *)alloc64(blk_bytes);
        if (!blk) return set_err(err, errlen, LUT_ENOMEM, "%s: out of memory (%zu bytes)", fn, blk_bytes);
    }
    for (int64_t n0 = 0; n0 < N; n0 += BLOCK) {
        const int rows = N - n0 < BLOCK ? (int)(N - n0) : BLOCK;
        if (mode == MODE_SCAN) {
            const uint8_t *src = codes_in + n0 * C;
            for (int j = 0; j < rows; j++)
                for (int64_t c = 0; c < C; c++) blk[c * BLOCK + j] = (uint8_t)(src[j * C + c] & 15u);
            if (rows < BLOCK)
                for (int64_t c = 0; c < C; c++) memset(blk + c * BLOCK + rows, 0, (size_t)(BLOCK - rows));
        } else {
            enc(p, X + n0 * D, rows, blk);
        }
        if (mode == MODE_ENCODE) {
            uint8_t *dst = codes_out + n0 * C;
            for (int j = 0; j < rows; j++)
                for (int64_t c = 0; c < C; c++) dst[j * C + c] = blk[c * BLOCK + j];
        } else {
            scan(p, blk, rows, Y + n0 * M, acc32);
        }
    }
    if (blk != stack_blk) free(blk);
    return LUT_OK;
}

int lut_encode(const lut_plan *plan, const float *X, int64_t N, uint8_t *codes, int path,
               char *err, size_t errlen) {
    return run_blocks(MODE_ENCODE, plan, X, NULL, N, codes, NULL, path, err, errlen);
}

int lut_scan(const lut_plan *plan, const uint8_t *codes, int64_t N, float *Y, int path,
             char *err, size_t errlen) {
    return run_blocks(MODE_SCAN, plan, NULL, codes, N, NULL, Y, path, err, errlen);
}

int lut_apply(const lut_plan *plan, const float *X, int64_t N, float *Y, int path, char *err,
              size_t errlen) {
    return run_blocks(MODE_APPLY, plan, X, NULL, N, NULL, Y, path, err, errlen);
}
