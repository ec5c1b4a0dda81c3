/*
 * lutkernel.c: LutMatMul encode + scan, scalar / AVX2 / AVX-512 paths in one compile.
 *
 * Semantics (docs/lutmatmul.md), per row n, codebook c, output m:
 *   code[n,c] = 4-level tree walk, q = 2*q + (X[n, split[c,l]] > thr[c][q]) from q = 1
 *               (q is the 1-based heap index; the code is q - 16 after four levels)
 *   acc[n,m]  = sum_c tables[m, c, code[n,c]]                  (exact integers)
 *   Y[n,m]    = (float)acc * scale + base[m],  base[m] = bias[m] + ((0+off[0])+off[1])+...
 *   relu:       Y = Y > 0 ? Y : 0
 * The float epilogue is written as separate multiply and add; the build uses
 * -ffp-contract=off so no path fuses them.
 *
 * Work is done in blocks of BLOCK = 64 rows: encode the block's codes into an L1-resident
 * scratch "blk", then scan it against every output.  The ONNX op splits rows over threads.
 *
 * Encode (AVX2 and AVX-512 share the first step).  For 16 rows at a time, the four split
 * values of each codebook are copied with scalar loads, four rows per 16-byte store, into a
 * column buffer vals[k*16 + r] (k: the split dims in ascending order; on Zen 4 this costs
 * about 0.75 cycles per value from L1 where vgatherdps costs 1.3), then the trees are walked
 * with one SIMD lane per row: the threshold of each lane's node is fetched from the
 * codebook's 16-float threshold vector with vpermps (AVX2: two 8-float halves, the last
 * level reads the upper half with index bits 0-2), compared, and q = 2q + (v > t).  NaN
 * compares false, as in the spec.  When X comes from L3 the copy is bound by moving X's
 * cache lines (every line of a row holds some split dim once C is large).  AVX-512 on
 * row-major X moves split dims packed at least WINDOW_MIN to 16 consecutive columns (a pruned
 * producer's dense prefix, compile/prune.py) by 16 row loads and a 16x16 transpose instead:
 * 10000x64 (C = 16, every split column in a 64-float prefix) encodes and scans in 81 us, not
 * 171 (scripts/bench_kernel.py).  The fitter's split_lines keeps a first layer's split dims
 * in a few lines of each row, so fewer lines move (FitOptions.split_lines).
 *
 * Scan, AVX-512 (F, BW, VL, VBMI, VNNI): one 64-byte vpermb table holds the 16-entry tables
 * of 4 codebooks of one output, and a codes register holds, for 16 rows, one dword per row
 * whose byte j is (code of codebook 4g+j) + 16j.  vpermb looks up 64 entries at once, and
 * vpdpbusd with a vector of ones adds each row's 4 looked-up bytes into its uint32
 * accumulator: exact, no overflow for C < 2^24, two instructions per 64 lookups.  (Measured
 * on Zen 4 in registers: about 46 lookups/cycle, against 21 for vpshufb plus exact 16-bit
 * widening; docs/results/bench_kernel.md.)  A tile is 16 outputs x 16 rows: 16 accumulators,
 * transposed 16x16 in registers, then dequantised (+bias, ReLU) and stored as 16
 * consecutive floats per row (a last tile of at most 4 outputs gets a 4-wide epilogue).
 *
 * Tables: a plan holds them once, in the AVX-512 layout [tile][group][16][64] (see "table
 * layout" below), so a tile's tables are one contiguous stream, kept in L1 while the tile
 * visits the block's four row groups.  The scalar and AVX2 scans read the same bytes by index
 * arithmetic: output m, codebook c is 16 bytes at tab_output(m) + tab_codebook(c).
 *
 * Scan, AVX2: codes are one byte per row and codebook (blk[c*BLOCK + row]), 32 rows per
 * register; each output's 16-byte table is broadcast to both lanes and looked up with
 * vpshufb, four outputs at a time (four consecutive slots of one tile, 64 bytes apart: a
 * group of 4 codebooks of the 4 outputs is 256 contiguous bytes).  The looked-up bytes are
 * accumulated exactly in 16-bit lanes with two accumulators per output:
 *   all += v (as 16-bit lanes: even-row byte + 256 * odd-row byte, mod 2^16)
 *   odd += v >> 8 (per 16-bit lane: the odd-row byte)
 * so that odd-row sums = odd and even-row sums = all - (odd << 8) (mod 2^16), exact while a
 * chunk holds at most 257 codebooks (257 * 255 = 65535).  Longer C is split into chunks of
 * 64 groups (256 codebooks) whose sums are flushed into uint32 accumulators, so any C works.
 * The scan runs over whole groups: the codebooks past C have zero tables and code 0.
 * The uint32 sums are kept in "phase" order: 32-bit lane p of phase q holds row 4p+q of
 * the register's rows (q = 0: even & 0xffff, 1: odd & 0xffff, 2: even >> 16,
 * 3: odd >> 16); the epilogue converts to float, applies scale/base/relu, transposes
 * outputs x rows in registers and stores each row's 4 consecutive outputs.
 *
 * Few rows (N <= ROW_PATH_MAX_N, row-major output: batch 1): a block's lanes would be mostly
 * empty, so each row is encoded by the scalar tree walk and scanned output-parallel from a
 * second, code-major copy of the tables, tabT[c][code][m]: for each codebook the row's code
 * selects one contiguous run of M bytes, which is widened and added into 16-bit lanes, one
 * output per lane (exact for 257 codebooks, then flushed to uint32), and the epilogue is the
 * same float multiply and add as everywhere.  The copy costs M*C*16 bytes more, so plans
 * whose tables exceed ROW_TABLE_MAX bytes keep to the blocks.
 *
 * Codes stay one per byte inside a block (the AVX-512 bytes are 6-bit vpermb indices):
 * a block's codes are C*64 bytes and never leave L1, so packing two per byte would only add
 * unpacking work to the scan's inner loop (a few percent, docs/results/bench_kernel.md).
 */
#include "lutkernel.h"
#include "lut_errors.h"

#include <immintrin.h>
#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define BLOCK 64   /* rows per block */
#define RG 16      /* rows per encode group (SIMD lanes of a tree walk) */
#define ENC_CH 16  /* codebooks per split-value copy (vals: 16*4*16 floats = 4 KB) */
#define WIN_FIELDS 4 /* a window: first column d0, first k, count, and whether k0 + j holds d0 + j */
#define WINDOW_MIN 8 /* AVX-512, row-major X: split dims within 16 consecutive columns from which
                     * the 16 rows' values are moved by one 16x16 transpose (see plan_windows) */
#define AVX2_OUTS 4 /* AVX2: outputs per scan pass */
#define CHUNK_GROUPS 64 /* AVX2: groups of 4 codebooks per exact uint16 accumulation chunk */
#define TILE 16    /* AVX-512: outputs per tile */
#define ALWAYS_INLINE inline __attribute__((always_inline))
#define ROW_PATH_MAX_N 3    /* at most this many rows: one at a time, tables read code-major (measured: from
                             * 4 rows, a block of 64 is as fast on some shapes, from 8 on every one) */
#define ROW_TABLE_MAX ((int64_t)1 << 26) /* bytes of tables up to which a plan keeps the copy */
#define ROW_FLUSH 257       /* codebooks an exact uint16 lane can sum: 257 * 255 = 65535 */
#define ROW_CHUNK 256       /* outputs per accumulation chunk of the row scan */

/* signed int32 -> float conversion is exact-equivalent while 255 * C < 2^31 */
#define SIGNED_CVT_MAX_C (INT32_MAX / 255)

struct lut_plan {
    int64_t D, M, C;
    int64_t Cq;       /* ceil(C / 4): groups of four codebooks */
    int64_t T;        /* ceil(M / TILE): tiles of 16 outputs */
    int relu;
    float scale;
    int32_t *split;   /* [C][4] */
    int32_t *gdim;    /* [C*4]: per chunk of ENC_CH codebooks, its split dims in ascending */
    int32_t *gpos;    /* order, and where in that order (c, l)'s value is (see gather)     */
    int32_t *win;     /* [C*4][4], per chunk: AVX-512 row-major windows (see plan_windows)      */
    int32_t *nwin;    /* [chunks]: windows of each chunk                                         */
    int32_t *lone;    /* [C*4], per chunk: the k's in no window, copied one value at a time      */
    int32_t *nlone;   /* [chunks]                                                                */
    float *thr;       /* [C][16]: thr[c][q] = threshold of 1-based heap node q; [c][0] = 0 */
    uint8_t *tab;     /* the tables, once, for every path: [T][Cq][TILE][64], zero padded
                       * past M and C (see tab_output); NULL in an encode-only plan */
    float *base;      /* [T*TILE] bias + offset_total, zero padded */
    uint8_t *tabT;    /* few rows: tabT[(c*16 + code)*ldt + m] = tables[m][c][code], zero past M;
                       * NULL when the tables exceed ROW_TABLE_MAX bytes */
    int64_t ldt;      /* M rounded up to 32 */
};

/* table layout: tile t = m / TILE, group g = c / 4, slot i = m % TILE hold the 64 bytes
 * tables[m][4g .. 4g+3][0..15]; output m's 16 entries of codebook c start at byte
 * tab_output(p, m) + tab_codebook(c).  Four consecutive outputs 4k..4k+3 are four consecutive
 * slots of one tile (TILE is a multiple of 4). */
static inline int64_t tab_output(const lut_plan *p, int64_t m) {
    return ((m / TILE) * p->Cq * TILE + m % TILE) * 64;
}
static inline int64_t tab_codebook(int64_t c) { return (c / 4) * TILE * 64 + (c % 4) * LUT_K; }

/* The rows an encoder reads: row r's dimension d is X[r*row_stride + d*col_stride]
 * (row-major X[N][D]: D, 1; dimension-major Xt[D][ld], as LutConv gathers it: 1, ld). */
typedef struct {
    const float *X;
    int64_t row_stride, col_stride;
} rows_view;

/* ------------------------------------------------------------------------------------ */
/* errors, allocation                                                                    */


static size_t round64(size_t bytes) { return (bytes + 63) & ~(size_t)63; }

static void *alloc64(size_t bytes) {
    const size_t rounded = round64(bytes);
    return aligned_alloc(64, rounded ? rounded : 64);
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
        /* the AVX-512 scan needs vpermb (VBMI) and vpdpbusd (VNNI): Ice Lake, Zen 4 and later */
        if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
            __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512vbmi") &&
            __builtin_cpu_supports("avx512vnni"))
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
    free(plan->gdim);
    free(plan->gpos);
    free(plan->win);
    free(plan->nwin);
    free(plan->lone);
    free(plan->nlone);
    free(plan->thr);
    free(plan->tab);
    free(plan->base);
    free(plan->tabT);
    free(plan);
}

int64_t lut_plan_D(const lut_plan *plan) { return plan ? plan->D : -1; }
int64_t lut_plan_M(const lut_plan *plan) { return plan ? plan->M : -1; }
int64_t lut_plan_C(const lut_plan *plan) { return plan ? plan->C : -1; }

int lut_check_sizes(int64_t D, int64_t M, int64_t C, int64_t K, char *err, size_t errlen) {
    if (D < 1 || D > LUT_MAX_D)
        return set_err(err, errlen, LUT_EINVAL, "attribute 'D' must satisfy 1 <= D <= 2^31-1, got %lld",
                       (long long)D);
    if (M < 1 || M > LUT_MAX_M)
        return set_err(err, errlen, LUT_EINVAL, "attribute 'M' must satisfy 1 <= M <= 2^40, got %lld",
                       (long long)M);
    if (C < 1 || C >= LUT_MAX_C)
        return set_err(err, errlen, LUT_EINVAL, "attribute 'C' must satisfy 1 <= C < 2^24, got %lld",
                       (long long)C);
    if (K != LUT_K)
        return set_err(err, errlen, LUT_EINVAL, "attribute 'K' must be 16, got %lld", (long long)K);
    return LUT_OK;
}

/* attribute `name` must have `expected` values (`formula`, e.g. "C*4") at a non-NULL data */
static int check_count(const char *name, const char *formula, int64_t expected, int64_t got,
                       const void *data, char *err, size_t errlen) {
    if (got != expected)
        return set_err(err, errlen, LUT_EINVAL, "attribute '%s' must have %s = %lld values, got %lld",
                       name, formula, (long long)expected, (long long)got);
    if (!data) return set_err(err, errlen, LUT_EINVAL, "attribute '%s' is missing (NULL)", name);
    return LUT_OK;
}

/* check_count, and every value finite */
static int check_finite(const char *name, const char *formula, int64_t expected, int64_t got,
                        const float *data, char *err, size_t errlen) {
    const int rc = check_count(name, formula, expected, got, data, err, errlen);
    if (rc != LUT_OK) return rc;
    for (int64_t i = 0; i < got; i++)
        if (!isfinite(data[i]))
            return set_err(err, errlen, LUT_EINVAL, "attribute '%s' value at index %lld is not finite (%g)",
                           name, (long long)i, (double)data[i]);
    return LUT_OK;
}

int lut_check_split_dims(int64_t D, int64_t C, const int64_t *split_dims, int64_t n_split,
                         char *err, size_t errlen) {
    const int rc = check_count("split_dims", "C*4", C * LUT_DEPTH, n_split, split_dims, err, errlen);
    if (rc != LUT_OK) return rc;
    for (int64_t i = 0; i < n_split; i++)
        if (split_dims[i] < 0 || split_dims[i] >= D)
            return set_err(err, errlen, LUT_EINVAL,
                           "attribute 'split_dims' value %lld at index %lld (codebook %lld, "
                           "level %lld) is outside [0, D=%lld)",
                           (long long)split_dims[i], (long long)i, (long long)(i / LUT_DEPTH),
                           (long long)(i % LUT_DEPTH), (long long)D);
    return LUT_OK;
}

/* Row-major X on the AVX-512 path: a chunk's sorted split dims are cut greedily into windows
 * of 16 consecutive columns [d0, d0 + 16) holding at least WINDOW_MIN of them; a window's values
 * for 16 rows are 16 row loads and one 16x16 transpose (64 shuffles) where copying them one
 * by one costs 12 inserts and 16 loads per dim.  Dense inputs (a producer that lays the split
 * columns out first, compile/prune.py) are all windows; scattered dims stay lone. */
static void plan_windows(lut_plan *p, int64_t c0, int n) {
    const int32_t *dim = p->gdim + c0 * LUT_DEPTH;
    int32_t *win = p->win + c0 * LUT_DEPTH * WIN_FIELDS, *lone = p->lone + c0 * LUT_DEPTH;
    int nw = 0, nl = 0;
    for (int k = 0; k < n;) {
        int32_t d0 = dim[k];
        if (d0 > p->D - RG) d0 = (int32_t)(p->D - RG); /* the window stays inside the row */
        int e = k;
        while (e < n && dim[e] < d0 + RG) e++;
        if (p->D >= RG && e - k >= WINDOW_MIN) {
            int dense = e - k == RG;
            for (int j = 0; dense && j < RG; j++) dense = dim[k + j] == d0 + j;
            int32_t *w = win + WIN_FIELDS * nw++;
            w[0] = d0;
            w[1] = k;
            w[2] = e - k;
            w[3] = dense;
            k = e;
        } else {
            lone[nl++] = k++;
        }
    }
    p->nwin[c0 / ENC_CH] = nw;
    p->nlone[c0 / ENC_CH] = nl;
}

static int plan_build(lut_plan **out, int encoder_only, int64_t D, int64_t M, int64_t C,
                      int64_t K, const int64_t *split_dims, int64_t n_split,
                      const float *thresholds, int64_t n_thresholds, const uint8_t *tables,
                      int64_t n_tables, float scale, const float *offsets, int64_t n_offsets,
                      const float *bias, int64_t n_bias, int64_t relu, char *err,
                      size_t errlen) {
    if (!out) return set_err(err, errlen, LUT_EINVAL, "lut_plan_create: out is NULL");
    *out = NULL;
    const int rc = lut_check_sizes(D, encoder_only ? 1 : M, C, encoder_only ? LUT_K : K, err, errlen);
    if (rc != LUT_OK) return rc;
    if (!encoder_only) {
        if (relu != 0 && relu != 1)
            return set_err(err, errlen, LUT_EINVAL, "attribute 'relu' must be 0 or 1, got %lld",
                           (long long)relu);
        if (!isfinite(scale) || !(scale > 0.0f))
            return set_err(err, errlen, LUT_EINVAL,
                           "attribute 'scale' must be finite and > 0, got %g", (double)scale);
    } else {
        M = 0;
    }
    int crc = lut_check_split_dims(D, C, split_dims, n_split, err, errlen);
    if (crc == LUT_OK) crc = check_count("thresholds", "C*15", C * LUT_NODES, n_thresholds, thresholds, err, errlen);
    if (crc != LUT_OK) return crc;
    if (!encoder_only) {
        /* padded M * padded C * 16 without overflow (M, C < 2^40, 2^24 already; be explicit) */
        if (M + TILE > INT64_MAX / ((C + 4) * LUT_K))
            return set_err(err, errlen, LUT_EINVAL, "attribute 'tables' would be too large");
        if (n_tables != M * C * LUT_K)
            return set_err(err, errlen, LUT_EINVAL,
                           "attribute 'tables' must have M*C*16 = %lld*%lld*16 = %lld bytes "
                           "(shape [M, C, 16]), got %lld",
                           (long long)M, (long long)C, (long long)(M * C * LUT_K),
                           (long long)n_tables);
        if (!tables)
            return set_err(err, errlen, LUT_EINVAL, "attribute 'tables' is missing (NULL)");
        crc = check_finite("offsets", "C", C, n_offsets, offsets, err, errlen);
        if (crc == LUT_OK) crc = check_finite("bias", "M", M, n_bias, bias, err, errlen);
        if (crc != LUT_OK) return crc;
    }


    lut_plan *p = (lut_plan *)calloc(1, sizeof *p);
    if (!p) return set_err(err, errlen, LUT_ENOMEM, "out of memory creating the LutMatMul plan");
    p->D = D;
    p->M = M;
    p->C = C;
    p->Cq = (C + 3) / 4;
    p->T = (M + TILE - 1) / TILE;
    p->relu = (int)relu;
    p->scale = encoder_only ? 1.0f : scale;
    p->split = (int32_t *)alloc64((size_t)C * LUT_DEPTH * sizeof(int32_t));
    p->thr = (float *)alloc64((size_t)C * 16 * sizeof(float));
    p->gdim = (int32_t *)alloc64((size_t)C * LUT_DEPTH * sizeof(int32_t));
    p->gpos = (int32_t *)alloc64((size_t)C * LUT_DEPTH * sizeof(int32_t));
    const int64_t chunks = (C + ENC_CH - 1) / ENC_CH;
    p->win = (int32_t *)alloc64((size_t)C * LUT_DEPTH * WIN_FIELDS * sizeof(int32_t));
    p->lone = (int32_t *)alloc64((size_t)C * LUT_DEPTH * sizeof(int32_t));
    p->nwin = (int32_t *)alloc64((size_t)chunks * sizeof(int32_t));
    p->nlone = (int32_t *)alloc64((size_t)chunks * sizeof(int32_t));
    if (!p->split || !p->thr || !p->gdim || !p->gpos || !p->win || !p->lone || !p->nwin || !p->nlone) goto oom;
    for (int64_t i = 0; i < C * LUT_DEPTH; i++) p->split[i] = (int32_t)split_dims[i];
    for (int64_t c0 = 0; c0 < C; c0 += ENC_CH) { /* sort each chunk's (dim, slot) by dim */
        const int n = (int)((C - c0 < ENC_CH ? C - c0 : ENC_CH) * LUT_DEPTH);
        int32_t *dim = p->gdim + c0 * LUT_DEPTH, *pos = p->gpos + c0 * LUT_DEPTH;
        int32_t slot[ENC_CH * LUT_DEPTH];
        for (int k = 0; k < n; k++) {
            const int32_t d = p->split[c0 * LUT_DEPTH + k];
            int i = k;
            for (; i > 0 && dim[i - 1] > d; i--) {
                dim[i] = dim[i - 1];
                slot[i] = slot[i - 1];
            }
            dim[i] = d;
            slot[i] = k;
        }
        for (int k = 0; k < n; k++) pos[slot[k]] = k;
        plan_windows(p, c0, n);
    }
    for (int64_t c = 0; c < C; c++) {
        p->thr[c * 16] = 0.0f; /* never read: heap nodes are 1..15 */
        memcpy(p->thr + c * 16 + 1, thresholds + c * LUT_NODES, LUT_NODES * sizeof(float));
    }
    if (!encoder_only) {
        const int64_t Mpad = p->T * TILE;
        const size_t tbytes = (size_t)Mpad * (size_t)p->Cq * 4 * LUT_K;
        p->tab = (uint8_t *)alloc64(tbytes);
        p->base = (float *)alloc64((size_t)Mpad * sizeof(float));
        if (!p->tab || !p->base) goto oom;
        float offset_total = 0.0f;
        for (int64_t c = 0; c < C; c++) offset_total = offset_total + offsets[c];
        for (int64_t m = 0; m < Mpad; m++) p->base[m] = m < M ? bias[m] + offset_total : 0.0f;
        memset(p->tab, 0, tbytes);
        for (int64_t m = 0; m < M; m++) {
            uint8_t *dst = p->tab + tab_output(p, m);
            for (int64_t c = 0; c < C; c++)
                memcpy(dst + tab_codebook(c), tables + (m * C + c) * LUT_K, LUT_K);
        }
        p->ldt = (M + 31) / 32 * 32;
        if (M * C * LUT_K <= ROW_TABLE_MAX) { /* then ldt * C * 16 < 2^27 */
            p->tabT = (uint8_t *)alloc64((size_t)(p->ldt * C * LUT_K));
            if (!p->tabT) goto oom;
            memset(p->tabT, 0, (size_t)(p->ldt * C * LUT_K));
            for (int64_t m = 0; m < M; m++)
                for (int64_t c = 0; c < C; c++)
                    for (int k = 0; k < LUT_K; k++) p->tabT[(c * LUT_K + k) * p->ldt + m] = tables[(m * C + c) * LUT_K + k];
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
/* block layouts                                                                         */

/* A block's codes, for rows 0..BLOCK-1 of the block:
 *   column layout (scalar, AVX2):  blk[c*BLOCK + j] = code of row j, codebook c;
 *   group layout (AVX-512):        blk[(g*BLOCK + j)*4 + i] = code of row j, codebook 4g+i,
 *                                  plus 16*i (the vpermb index into the group's 64-byte
 *                                  table); codebooks past C have code 0.
 * Both take ceil(C/4)*4*BLOCK bytes.  Rows past the block's valid rows hold valid codes
 * (0..15) whose results are never stored. */
enum { LAYOUT_COLUMN, LAYOUT_GROUP };

/* codes[rows][C] (each used modulo 16) -> blk; rows..BLOCK-1 get code 0 */
static void codes_to_blk(const lut_plan *p, int layout, const uint8_t *codes, int rows,
                         uint8_t *blk) {
    const int64_t C = p->C;
    if (layout == LAYOUT_COLUMN) {
        memset(blk, 0, (size_t)p->Cq * 4 * BLOCK);
        for (int j = 0; j < rows; j++)
            for (int64_t c = 0; c < C; c++) blk[c * BLOCK + j] = (uint8_t)(codes[(int64_t)j * C + c] & 15u);
        return;
    }
    /* group layout: one little-endian dword per row and group, byte i += 16 i */
    uint32_t *dst = (uint32_t *)(void *)blk;
    const int64_t full = C / 4; /* groups with 4 codebooks */
    for (int j = 0; j < BLOCK; j++) {
        const uint8_t *src = codes + (int64_t)j * C;
        for (int64_t g = 0; g < p->Cq; g++) {
            uint32_t w = 0;
            if (j < rows) {
                if (g < full) {
                    memcpy(&w, src + 4 * g, 4);
                    w &= 0x0F0F0F0Fu;
                } else {
                    for (int i = 0; i < (int)(C - 4 * g); i++) w |= (uint32_t)(src[4 * g + i] & 15u) << (8 * i);
                }
            }
            dst[g * BLOCK + j] = w + 0x30201000u;
        }
    }
}

/* blk -> codes[rows][C] */
static void blk_to_codes(const lut_plan *p, int layout, const uint8_t *blk, int rows,
                         uint8_t *codes) {
    const int64_t C = p->C;
    if (layout == LAYOUT_COLUMN) {
        for (int j = 0; j < rows; j++)
            for (int64_t c = 0; c < C; c++) codes[(int64_t)j * C + c] = blk[c * BLOCK + j];
        return;
    }
    for (int j = 0; j < rows; j++)
        for (int64_t g = 0; g < p->Cq; g++) {
            const uint32_t w = ((const uint32_t *)(const void *)blk)[g * BLOCK + j] & 0x0F0F0F0Fu;
            const int n = C - 4 * g < 4 ? (int)(C - 4 * g) : 4;
            memcpy(codes + (int64_t)j * C + 4 * g, &w, (size_t)n); /* little-endian bytes */
        }
}

/* ------------------------------------------------------------------------------------ */
/* scalar path                                                                           */

/* column layout; X points at the block's first row; rows..BLOCK-1 get code 0 */
/* Codebook c's code of one row (its dimension d at x[d*col_stride]): the tree walk itself */
static inline uint8_t walk_scalar(const lut_plan *p, int64_t c, const float *x, int64_t col_stride) {
    const int32_t *sd = p->split + c * LUT_DEPTH;
    const float *th = p->thr + c * 16;
    unsigned q = 1;
    for (int l = 0; l < LUT_DEPTH; l++) q = 2u * q + (x[sd[l] * col_stride] > th[q] ? 1u : 0u);
    return (uint8_t)(q - 16u);
}

/* Output m of an exact sum: float(acc) * scale + base[m], then ReLU (y > 0 ? y : +0) */
static inline float dequantise_scalar(const lut_plan *p, uint32_t acc, int64_t m) {
    const float v = (float)acc * p->scale + p->base[m];
    return p->relu ? (v > 0.0f ? v : 0.0f) : v;
}

static void encode_block_scalar(const lut_plan *p, rows_view v, int rows, uint8_t *blk) {
    memset(blk, 0, (size_t)p->Cq * 4 * BLOCK);
    for (int64_t c = 0; c < p->C; c++)
        for (int j = 0; j < rows; j++) blk[c * BLOCK + j] = walk_scalar(p, c, v.X + (int64_t)j * v.row_stride, v.col_stride);
}

/* column layout; Y points at the block's first output row.  The tables are read in the
 * order they are stored: per tile of 16 outputs, group by group, each slot's 64 bytes. */
static void scan_block_scalar(const lut_plan *p, const uint8_t *blk, int rows, float *Y,
                              uint32_t *scratch) {
    (void)scratch;
    const int64_t M = p->M, C = p->C;
    for (int j = 0; j < rows; j++) {
        float *y = Y + (int64_t)j * M;
        for (int64_t m0 = 0; m0 < M; m0 += TILE) {
            const int mc = M - m0 < TILE ? (int)(M - m0) : TILE;
            const uint8_t *s = p->tab + tab_output(p, m0);
            uint32_t acc[TILE] = {0};
            for (int64_t c0 = 0; c0 < C; c0 += 4, s += TILE * 64) {
                /* the group's codes as offsets into a slot's 64 bytes (tab_codebook); a
                 * codebook past C reads entry 0 of its table, which is zero padding */
                int q[4];
                for (int k = 0; k < 4; k++) q[k] = k * LUT_K + (c0 + k < C ? blk[(c0 + k) * BLOCK + j] : 0);
                for (int i = 0; i < mc; i++)
                    acc[i] += (uint32_t)(s[i * 64 + q[0]] + s[i * 64 + q[1]] + s[i * 64 + q[2]] + s[i * 64 + q[3]]);
            }
            for (int i = 0; i < mc; i++) y[m0 + i] = dequantise_scalar(p, acc[i], m0 + i);
        }
    }
}

/* ------------------------------------------------------------------------------------ */
/* shared by the SIMD encoders                                                           */

/* vals[k*RG + r] = X[r][dim[k]] for row-major X, for k = ks[0..n) (ks NULL: k = 0..n-1): each
 * pass reads four rows front to back (a forward stream the prefetchers follow), sharing the
 * index loads, and writes 4 rows per store. */
__attribute__((target("avx2")))
static ALWAYS_INLINE void copy_split_values(rows_view v, int rows, const int32_t *dim, const int32_t *ks,
                                            int n, float *vals) {
    for (int r = 0; r < RG; r += 4) {
        if (r >= rows) { /* no valid row in this pass (small N): zeros, not 4 more loads each */
            for (int i = 0; i < n; i++) _mm_store_ps(vals + (ks ? ks[i] : i) * RG + r, _mm_setzero_ps());
            continue;
        }
        const float *x[4];
        for (int i = 0; i < 4; i++) x[i] = v.X + (int64_t)(r + i < rows ? r + i : rows - 1) * v.row_stride;
        for (int i = 0; i < n; i++) {
            const int k = ks ? ks[i] : i;
            const int32_t d = dim[k];
            __m128 e = _mm_load_ss(x[0] + d);
            e = _mm_insert_ps(e, _mm_load_ss(x[1] + d), 0x10);
            e = _mm_insert_ps(e, _mm_load_ss(x[2] + d), 0x20);
            e = _mm_insert_ps(e, _mm_load_ss(x[3] + d), 0x30);
            _mm_store_ps(vals + k * RG + r, e);
        }
    }
}

/* vals[k*RG + r] = X[r][gdim[4*c0 + k]] for the RG rows of a group (v.X points at its first
 * row) and the split dims of codebooks c0 <= c < c1 (a chunk of ENC_CH) in ascending order;
 * the value of (c, l) is at k = gpos[4c + l].  Rows past `rows` repeat the last valid row or
 * are zero: their codes are computed, never stored.  Row-major X: each pass reads four rows
 * front to back (a forward stream the prefetchers follow), sharing the index loads, and
 * writes 4 rows per store.  Dimension-major X: each split dim's rows are one contiguous run. */
__attribute__((target("avx2")))
static ALWAYS_INLINE void gather_split_values(const lut_plan *p, rows_view v, int rows,
                                              int64_t c0, int64_t c1, float *vals) {
    const int32_t *dim = p->gdim + c0 * LUT_DEPTH;
    const int n = (int)(c1 - c0) * LUT_DEPTH;
    if (v.col_stride != 1) {
        for (int k = 0; k < n; k++) {
            const float *src = v.X + (int64_t)dim[k] * v.col_stride;
            float *dst = vals + k * RG;
            if (rows == RG && v.row_stride == 1) {
                _mm256_store_ps(dst, _mm256_loadu_ps(src));
                _mm256_store_ps(dst + 8, _mm256_loadu_ps(src + 8));
                continue;
            }
            for (int r = 0; r < RG; r++) dst[r] = r < rows ? src[(int64_t)r * v.row_stride] : 0.0f;
        }
        return;
    }
    copy_split_values(v, rows, dim, NULL, n, vals);
}

/* ------------------------------------------------------------------------------------ */
/* AVX2 path                                                                             */

#define AVX2_TARGET __attribute__((target("avx2")))

/* Tree walk of one codebook for 8 rows: the split value of level l and row r is
 * v[pos[l]*RG + r], th holds the codebook's 16 heap thresholds.  Returns q = code + 16. */
AVX2_TARGET
static ALWAYS_INLINE __m256i walk8_avx2(const float *th, const float *v, const int32_t *pos) {
    const __m256 lo = _mm256_load_ps(th), hi = _mm256_load_ps(th + 8);
    /* level 0: q = 2 + (v > thr[1]); a true compare is all ones (-1), so q - mask adds 1 */
    __m256 gt = _mm256_cmp_ps(_mm256_load_ps(v + pos[0] * RG), _mm256_broadcast_ss(th + 1), _CMP_GT_OQ);
    __m256i q = _mm256_sub_epi32(_mm256_set1_epi32(2), _mm256_castps_si256(gt));
    for (int l = 1; l < LUT_DEPTH; l++) {
        /* nodes 2..7 are in the lower half; level 3's nodes 8..15 in the upper (q & 7) */
        const __m256 t = _mm256_permutevar8x32_ps(l < 3 ? lo : hi, q);
        gt = _mm256_cmp_ps(_mm256_load_ps(v + pos[l] * RG), t, _CMP_GT_OQ); /* NaN compares false */
        q = _mm256_sub_epi32(_mm256_add_epi32(q, q), _mm256_castps_si256(gt));
    }
    return q;
}

/* column layout */
AVX2_TARGET
static void encode_block_avx2(const lut_plan *p, rows_view v, int rows, uint8_t *blk) {
    _Alignas(64) float vals[ENC_CH * LUT_DEPTH * RG];
    const int64_t C = p->C;
    const __m256i sixteen = _mm256_set1_epi32(16);
    memset(blk + C * BLOCK, 0, (size_t)(p->Cq * 4 - C) * BLOCK); /* the last group's padding */
    for (int r0 = 0; r0 < BLOCK; r0 += RG) {
        if (r0 >= rows) {
            for (int64_t c = 0; c < C; c++) memset(blk + c * BLOCK + r0, 0, RG);
            continue;
        }
        const int valid = rows - r0 < RG ? rows - r0 : RG;
        const rows_view group = {v.X + (int64_t)r0 * v.row_stride, v.row_stride, v.col_stride};
        for (int64_t c0 = 0; c0 < C; c0 += ENC_CH) {
            const int64_t c1 = C - c0 < ENC_CH ? C : c0 + ENC_CH;
            gather_split_values(p, group, valid, c0, c1, vals);
            for (int64_t c = c0; c < c1; c++) {
                const int32_t *pos = p->gpos + c * LUT_DEPTH;
                const __m256i a = _mm256_sub_epi32(walk8_avx2(p->thr + c * 16, vals, pos), sixteen);
                const __m256i b = _mm256_sub_epi32(walk8_avx2(p->thr + c * 16, vals + 8, pos), sixteen);
                /* 16 dwords -> 16 bytes in row order: packus works per 128-bit lane */
                const __m256i w = _mm256_permute4x64_epi64(_mm256_packus_epi32(a, b), 0xD8);
                const __m128i codes = _mm_packus_epi16(_mm256_castsi256_si128(w),
                                                       _mm256_extracti128_si256(w, 1));
                _mm_storeu_si128((__m128i *)(blk + c * BLOCK + r0), codes);
            }
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
    const int64_t M = p->M, C = p->C, Cq = p->Cq;
    const __m256 vscale = _mm256_set1_ps(p->scale);
    const __m256 zero = _mm256_setzero_ps();
    const __m256i lo16 = _mm256_set1_epi32(0xffff);
    const int small = C <= SIGNED_CVT_MAX_C;
    const int relu = p->relu;
    /* outputs outer, rows inner: the 4 outputs' tables (C*64 bytes) stay in L1 for the
     * block's second half */
    for (int64_t m0 = 0; m0 < M; m0 += AVX2_OUTS) {
        const int mb = M - m0 < AVX2_OUTS ? (int)(M - m0) : AVX2_OUTS;
        /* slots m0 .. m0+3 of one tile, 64 bytes apart; padding slots are zeros */
        const uint8_t *tg = p->tab + tab_output(p, m0);
        for (int r0 = 0; r0 < rows; r0 += 32) {
            const int hrows = rows - r0 < 32 ? rows - r0 : 32;
            for (int64_t g0 = 0; g0 < Cq; g0 += CHUNK_GROUPS) {
                const int64_t g1 = Cq - g0 < CHUNK_GROUPS ? Cq : g0 + CHUNK_GROUPS;
                __m256i aa0 = _mm256_setzero_si256(), aa1 = aa0, aa2 = aa0, aa3 = aa0;
                __m256i ao0 = aa0, ao1 = aa0, ao2 = aa0, ao3 = aa0;
                for (int64_t g = g0; g < g1; g++) {
                    const uint8_t *codes_g = blk + g * 4 * BLOCK + r0, *tab_g = tg + g * TILE * 64;
                    /* codebook 4g + k: 16 bytes per slot.  Two codebooks per iteration: all
                     * four unrolled spill registers, and both are slower (a few %) */
#pragma GCC unroll 2
                    for (int k = 0; k < 4; k++) {
                        const __m256i codes = _mm256_loadu_si256((const __m256i *)(codes_g + k * BLOCK));
                        const uint8_t *t = tab_g + k * LUT_K;
                        __m256i v;
#define AVX2_STEP(i, aa, ao)                                                                      \
    v = _mm256_shuffle_epi8(_mm256_broadcastsi128_si256(_mm_load_si128((const __m128i *)(t + 64 * (i)))), codes); \
    ao = _mm256_add_epi16(ao, _mm256_srli_epi16(v, 8));                                           \
    aa = _mm256_add_epi16(aa, v);
                        AVX2_STEP(0, aa0, ao0)
                        AVX2_STEP(1, aa1, ao1)
                        AVX2_STEP(2, aa2, ao2)
                        AVX2_STEP(3, aa3, ao3)
#undef AVX2_STEP
                    }
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
                        if (g0 == 0)
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


/* ------------------------------------------------------------------------------------ */
/* AVX-512 path                                                                          */

#define AVX512_TARGET \
    __attribute__((target("avx2,avx512f,avx512bw,avx512vl,avx512vbmi,avx512vnni")))

/* Tree walk of one codebook for 16 rows (see walk8_avx2).  Returns q = code + 16. */
AVX512_TARGET
static ALWAYS_INLINE __m512i walk16_avx512(const float *th, const float *v, const int32_t *pos) {
    const __m512 thr = _mm512_load_ps(th);
    const __m512i one = _mm512_set1_epi32(1);
    __mmask16 gt = _mm512_cmp_ps_mask(_mm512_load_ps(v + pos[0] * RG), _mm512_set1_ps(th[1]), _CMP_GT_OQ);
    __m512i q = _mm512_mask_blend_epi32(gt, _mm512_set1_epi32(2), _mm512_set1_epi32(3));
    for (int l = 1; l < LUT_DEPTH; l++) {
        gt = _mm512_cmp_ps_mask(_mm512_load_ps(v + pos[l] * RG), _mm512_permutexvar_ps(q, thr),
                                _CMP_GT_OQ); /* NaN compares false */
        q = _mm512_add_epi32(q, q);
        q = _mm512_mask_add_epi32(q, gt, q, one);
    }
    return q;
}

/* In-place 16x16 transpose of 32-bit elements: r[i] lane j -> r[j] lane i. */
AVX512_TARGET
static ALWAYS_INLINE void transpose16_avx512(__m512 r[16]) {
    __m512 t[16];
    for (int i = 0; i < 8; i++) {
        t[2 * i] = _mm512_unpacklo_ps(r[2 * i], r[2 * i + 1]);
        t[2 * i + 1] = _mm512_unpackhi_ps(r[2 * i], r[2 * i + 1]);
    }
    for (int i = 0; i < 4; i++) { /* r[4i+k], 128-bit lane L: rows 4i..4i+3, element 4L+k */
        const __m512d a = _mm512_castps_pd(t[4 * i]), b = _mm512_castps_pd(t[4 * i + 1]);
        const __m512d c = _mm512_castps_pd(t[4 * i + 2]), d = _mm512_castps_pd(t[4 * i + 3]);
        r[4 * i + 0] = _mm512_castpd_ps(_mm512_unpacklo_pd(a, c));
        r[4 * i + 1] = _mm512_castpd_ps(_mm512_unpackhi_pd(a, c));
        r[4 * i + 2] = _mm512_castpd_ps(_mm512_unpacklo_pd(b, d));
        r[4 * i + 3] = _mm512_castpd_ps(_mm512_unpackhi_pd(b, d));
    }
    for (int h = 0; h < 2; h++) /* then move whole 128-bit lanes, in two rounds */
        for (int k = 0; k < 4; k++) {
            t[8 * h + k] = _mm512_shuffle_f32x4(r[8 * h + k], r[8 * h + 4 + k], 0x88);
            t[8 * h + 4 + k] = _mm512_shuffle_f32x4(r[8 * h + k], r[8 * h + 4 + k], 0xDD);
        }
    for (int k = 0; k < 8; k++) {
        r[k] = _mm512_shuffle_f32x4(t[k], t[8 + k], 0x88);
        r[8 + k] = _mm512_shuffle_f32x4(t[k], t[8 + k], 0xDD);
    }
}

/* gather_split_values for row-major X through the chunk's windows (plan_windows): 16 rows
 * of a window's 16 columns are loaded and transposed, so that vector j holds column d0 + j of
 * the 16 rows; the window's split dims take theirs.  Lone dims are copied one by one.  Rows
 * past `rows` repeat the last valid row (their codes are never stored). */
AVX512_TARGET
static ALWAYS_INLINE void gather_windows_avx512(const lut_plan *p, rows_view v, int rows, int64_t c0,
                                                float *vals) {
    const int32_t *dim = p->gdim + c0 * LUT_DEPTH, *win = p->win + c0 * LUT_DEPTH * WIN_FIELDS;
    const int nw = p->nwin[c0 / ENC_CH];
    for (int w = 0; w < nw; w++) {
        const int32_t *window = win + WIN_FIELDS * w;
        const int32_t d0 = window[0], k0 = window[1], count = window[2];
        __m512 r[RG];
        for (int j = 0; j < RG; j++)
            r[j] = _mm512_loadu_ps(v.X + (int64_t)(j < rows ? j : rows - 1) * v.row_stride + d0);
        transpose16_avx512(r);
        if (window[3]) { /* the window's 16 columns, each once */
            for (int j = 0; j < RG; j++) _mm512_store_ps(vals + (k0 + j) * RG, r[j]);
            continue;
        }
        _Alignas(64) float columns[RG * RG];
        for (int j = 0; j < RG; j++) _mm512_store_ps(columns + j * RG, r[j]);
        for (int k = k0; k < k0 + count; k++)
            _mm512_store_ps(vals + k * RG, _mm512_load_ps(columns + (dim[k] - d0) * RG));
    }
    copy_split_values(v, rows, dim, p->lone + c0 * LUT_DEPTH, p->nlone[c0 / ENC_CH], vals);
}

/* group layout */
AVX512_TARGET
static void encode_block_avx512(const lut_plan *p, rows_view v, int rows, uint8_t *blk) {
    _Alignas(64) float vals[ENC_CH * LUT_DEPTH * RG];
    const int64_t C = p->C;
    /* q_i = code_i + 16; byte i must be code_i + 16 i: add -16, 0, +16, +32 to the bytes
     * (no byte over- or underflows, so one 32-bit add does it) */
    const __m512i adjust = _mm512_set1_epi32(0x20100000 - 16);
    const __m512i empty = _mm512_set1_epi32(16); /* q of a padding codebook: code 0 */
    for (int r0 = 0; r0 < rows; r0 += RG) {
        const int valid = rows - r0 < RG ? rows - r0 : RG;
        const rows_view group = {v.X + (int64_t)r0 * v.row_stride, v.row_stride, v.col_stride};
        for (int64_t c0 = 0; c0 < C; c0 += ENC_CH) { /* ENC_CH is a multiple of 4 */
            const int64_t c1 = C - c0 < ENC_CH ? C : c0 + ENC_CH;
            if (group.col_stride == 1)
                gather_windows_avx512(p, group, valid, c0, vals);
            else
                gather_split_values(p, group, valid, c0, c1, vals);
            for (int64_t c = c0; c < c1; c += 4) {
                __m512i q[4];
                for (int i = 0; i < 4; i++)
                    q[i] = c + i < c1 ? walk16_avx512(p->thr + (c + i) * 16, vals,
                                                      p->gpos + (c + i) * LUT_DEPTH)
                                      : empty;
                __m512i w = _mm512_ternarylogic_epi32(q[0], _mm512_slli_epi32(q[1], 8),
                                                      _mm512_slli_epi32(q[2], 16), 0xFE); /* or */
                w = _mm512_or_si512(w, _mm512_slli_epi32(q[3], 24));
                _mm512_store_si512((void *)(blk + ((c / 4) * BLOCK + r0) * 4),
                                   _mm512_add_epi32(w, adjust));
            }
        }
    }
    /* row groups past the valid rows are never scanned */
}

/* acc[i] (lane j = row j) += sum over groups of the tables of the tile's output slot i,
 * for slots 0..n-1 (n a compile-time constant after inlining).  codes points at group 0 of
 * the row group in the block, tab at group 0 of the tile. */
AVX512_TARGET
static ALWAYS_INLINE void accumulate_avx512(const uint8_t *codes, const uint8_t *tab,
                                            int64_t Cq, int n, __m512i acc[TILE]) {
    const __m512i ones = _mm512_set1_epi8(1);
    for (int i = 0; i < n; i++) acc[i] = _mm512_setzero_si512();
    for (int64_t g = 0; g < Cq; g++) {
        const __m512i idx = _mm512_load_si512((const void *)(codes + g * BLOCK * 4));
        const uint8_t *t = tab + g * TILE * 64;
        for (int i = 0; i < n; i++) {
            const __m512i v = _mm512_permutexvar_epi8(idx, _mm512_load_si512((const void *)(t + 64 * i)));
            acc[i] = _mm512_dpbusd_epi32(acc[i], v, ones); /* += the 4 bytes of each row */
        }
    }
    for (int i = n; i < TILE; i++) acc[i] = _mm512_setzero_si512();
}

/* The epilogue of every AVX-512 scan: float(acc) * scale + base, then ReLU (y > 0 ? y : +0)
 * if the plan has one; the operations and their order are the scalar path's. */
AVX512_TARGET
static ALWAYS_INLINE __m512 dequantise_avx512(const lut_plan *p, __m512i acc, __m512 vscale, __m512 vbase) {
    const __m512 y = _mm512_add_ps(_mm512_mul_ps(_mm512_cvtepu32_ps(acc), vscale), vbase);
    return p->relu ? _mm512_max_ps(y, _mm512_setzero_ps()) : y;
}

/* Outputs m0..m0+mc-1 (mc <= 4) of acc[0..3] (lane j = row j) for rows 0..nr-1 of Y. */
AVX512_TARGET
static ALWAYS_INLINE void store4_avx512(const lut_plan *p, const __m512i acc[4], int64_t m0,
                                        int mc, int nr, float *Y) {
    __m512 f[4];
    for (int i = 0; i < 4; i++)
        f[i] = dequantise_avx512(p, acc[i], _mm512_set1_ps(p->scale), _mm512_set1_ps(p->base[m0 + i]));
    const __m512d t0 = _mm512_castps_pd(_mm512_unpacklo_ps(f[0], f[1]));
    const __m512d t1 = _mm512_castps_pd(_mm512_unpackhi_ps(f[0], f[1]));
    const __m512d t2 = _mm512_castps_pd(_mm512_unpacklo_ps(f[2], f[3]));
    const __m512d t3 = _mm512_castps_pd(_mm512_unpackhi_ps(f[2], f[3]));
    __m512 g[4]; /* g[k], 128-bit lane L: the 4 outputs of row 4L + k */
    g[0] = _mm512_castpd_ps(_mm512_unpacklo_pd(t0, t2));
    g[1] = _mm512_castpd_ps(_mm512_unpackhi_pd(t0, t2));
    g[2] = _mm512_castpd_ps(_mm512_unpacklo_pd(t1, t3));
    g[3] = _mm512_castpd_ps(_mm512_unpackhi_pd(t1, t3));
    const __mmask8 sm = (__mmask8)((1u << mc) - 1u);
    const int64_t M = p->M;
    for (int k = 0; k < 4; k++) {
        const __m128 lane[4] = {_mm512_castps512_ps128(g[k]), _mm512_extractf32x4_ps(g[k], 1),
                                _mm512_extractf32x4_ps(g[k], 2), _mm512_extractf32x4_ps(g[k], 3)};
        for (int L = 0; L < 4; L++) {
            const int r = 4 * L + k;
            if (r >= nr) continue;
            if (mc == 4)
                _mm_storeu_ps(Y + (int64_t)r * M + m0, lane[L]);
            else
                _mm_mask_storeu_ps(Y + (int64_t)r * M + m0, sm, lane[L]);
        }
    }
}

/* accumulate_avx512 for a tile's mc used outputs, rounded up to 4 */
AVX512_TARGET
static ALWAYS_INLINE void accumulate_tile_avx512(const uint8_t *codes, const uint8_t *tab, int64_t Cq, int mc,
                                                 __m512i acc[TILE]) {
    switch ((mc + 3) / 4) {
    case 1: accumulate_avx512(codes, tab, Cq, 4, acc); break;
    case 2: accumulate_avx512(codes, tab, Cq, 8, acc); break;
    case 3: accumulate_avx512(codes, tab, Cq, 12, acc); break;
    default: accumulate_avx512(codes, tab, Cq, 16, acc); break;
    }
}

/* group layout, dimension-major output: Y[m*ldy + r] for the block's rows r (Y points at
 * the block's first row of output 0).  The accumulators already hold 16 rows of one output
 * per register, so each is dequantised and stored as it is: no transpose. */
AVX512_TARGET
static void scan_block_avx512_columns(const lut_plan *p, const uint8_t *blk, int rows, float *Y, int64_t ldy) {
    const int64_t M = p->M, Cq = p->Cq;
    const __m512 vscale = _mm512_set1_ps(p->scale);
    for (int64_t t = 0; t < p->T; t++) {
        const int64_t m0 = t * TILE;
        const int mc = M - m0 < TILE ? (int)(M - m0) : TILE;
        const uint8_t *tab = p->tab + tab_output(p, m0); /* the tile's [Cq][TILE][64] */
        for (int r0 = 0; r0 < rows; r0 += RG) {
            __m512i acc[TILE];
            accumulate_tile_avx512(blk + (size_t)r0 * 4, tab, Cq, mc, acc);
            const int nr = rows - r0 < RG ? rows - r0 : RG;
            const __mmask16 rmask = (__mmask16)((1u << nr) - 1u);
            for (int i = 0; i < mc; i++) {
                const __m512 y = dequantise_avx512(p, acc[i], vscale, _mm512_set1_ps(p->base[m0 + i]));
                if (nr == RG)
                    _mm512_storeu_ps(Y + (m0 + i) * ldy + r0, y);
                else
                    _mm512_mask_storeu_ps(Y + (m0 + i) * ldy + r0, rmask, y);
            }
        }
    }
}

/* group layout; Y points at the block's first output row */
AVX512_TARGET
static void scan_block_avx512(const lut_plan *p, const uint8_t *blk, int rows, float *Y,
                              uint32_t *scratch) {
    (void)scratch;
    const int64_t M = p->M, Cq = p->Cq;
    const __m512 vscale = _mm512_set1_ps(p->scale);
    for (int64_t t = 0; t < p->T; t++) {
        const int64_t m0 = t * TILE;
        const int mc = M - m0 < TILE ? (int)(M - m0) : TILE;
        const __mmask16 smask = (__mmask16)((1u << mc) - 1u);
        const uint8_t *tab = p->tab + tab_output(p, m0); /* the tile's [Cq][TILE][64] */
        const __m512 vbase = _mm512_load_ps(p->base + m0);
        for (int r0 = 0; r0 < rows; r0 += RG) {
            const uint8_t *codes = blk + (size_t)r0 * 4;
            __m512i acc[TILE];
            accumulate_tile_avx512(codes, tab, Cq, mc, acc);
            const int nr = rows - r0 < RG ? rows - r0 : RG;
            if (mc <= 4) { /* a last tile of 1-4 outputs: 4-wide epilogue, 16-byte stores */
                store4_avx512(p, acc, m0, mc, nr, Y + (int64_t)r0 * M);
                continue;
            }
            /* epilogue: rows x outputs -> outputs x rows, dequantise, store */
            __m512 f[TILE];
            for (int i = 0; i < TILE; i++) f[i] = _mm512_castsi512_ps(acc[i]);
            transpose16_avx512(f);
            for (int j = 0; j < nr; j++) {
                const __m512 y = dequantise_avx512(p, _mm512_castps_si512(f[j]), vscale, vbase);
                float *dst = Y + (int64_t)(r0 + j) * M + m0;
                if (mc == TILE)
                    _mm512_storeu_ps(dst, y);
                else
                    _mm512_mask_storeu_ps(dst, smask, y);
            }
        }
    }
}

/* ------------------------------------------------------------------------------------ */
/* few rows: one row at a time, output-parallel over the code-major tables (tabT)         */

static inline const uint8_t *row_table(const lut_plan *p, int64_t c, const uint8_t *code) {
    return p->tabT + (c * LUT_K + (code[c] & 15u)) * p->ldt;
}

static void scan_row_scalar(const lut_plan *p, const uint8_t *code, float *y) {
    for (int64_t m0 = 0; m0 < p->M; m0 += ROW_CHUNK) {
        const int mc = p->M - m0 < ROW_CHUNK ? (int)(p->M - m0) : ROW_CHUNK;
        uint32_t acc[ROW_CHUNK];
        memset(acc, 0, sizeof acc);
        for (int64_t c = 0; c < p->C; c++) {
            const uint8_t *t = row_table(p, c, code) + m0;
            for (int i = 0; i < mc; i++) acc[i] += t[i];
        }
        for (int i = 0; i < mc; i++) y[m0 + i] = dequantise_scalar(p, acc[i], m0 + i);
    }
}

/* 16-bit lanes, 16 outputs a vector; a chunk of ROW_CHUNK outputs is nv vectors (tabT's rows
 * are padded with zeros to a multiple of 32, so a vector never reads past them) */
AVX2_TARGET
static void scan_row_avx2(const lut_plan *p, const uint8_t *code, float *y) {
    const int small = p->C <= SIGNED_CVT_MAX_C;
    const __m256 vscale = _mm256_set1_ps(p->scale), zero = _mm256_setzero_ps();
    for (int64_t m0 = 0; m0 < p->M; m0 += ROW_CHUNK) {
        const int mc = p->M - m0 < ROW_CHUNK ? (int)(p->M - m0) : ROW_CHUNK, nv = (mc + 15) / 16;
        _Alignas(32) uint32_t acc[ROW_CHUNK];
        memset(acc, 0, sizeof acc);
        for (int64_t c0 = 0; c0 < p->C; c0 += ROW_FLUSH) {
            const int64_t c1 = p->C - c0 < ROW_FLUSH ? p->C : c0 + ROW_FLUSH;
            __m256i a16[ROW_CHUNK / 16];
            for (int k = 0; k < ROW_CHUNK / 16; k++) a16[k] = _mm256_setzero_si256();
            for (int64_t c = c0; c < c1; c++) {
                const uint8_t *t = row_table(p, c, code) + m0;
                for (int k = 0; k < ROW_CHUNK / 16; k++)
                    if (k < nv)
                        a16[k] = _mm256_add_epi16(a16[k], _mm256_cvtepu8_epi16(_mm_loadu_si128((const __m128i *)(const void *)(t + 16 * k))));
            }
            for (int k = 0; k < nv; k++) {
                __m256i *a = (__m256i *)(void *)(acc + 16 * k);
                a[0] = _mm256_add_epi32(a[0], _mm256_cvtepu16_epi32(_mm256_castsi256_si128(a16[k])));
                a[1] = _mm256_add_epi32(a[1], _mm256_cvtepu16_epi32(_mm256_extracti128_si256(a16[k], 1)));
            }
        }
        for (int i = 0; i < mc; i += 8) {
            __m256 v = _mm256_add_ps(_mm256_mul_ps(u32_to_ps_avx2(_mm256_load_si256((const __m256i *)(const void *)(acc + i)), small), vscale),
                                     _mm256_loadu_ps(p->base + m0 + i));
            if (p->relu) v = _mm256_max_ps(v, zero);
            if (mc - i >= 8) {
                _mm256_storeu_ps(y + m0 + i, v);
            } else {
                _Alignas(32) float tail[8];
                _mm256_store_ps(tail, v);
                memcpy(y + m0 + i, tail, sizeof(float) * (size_t)(mc - i));
            }
        }
    }
}

/* 32 outputs a vector (vpmovzxbw), the epilogue 16 a vector with masked stores */
AVX512_TARGET
static void scan_row_avx512(const lut_plan *p, const uint8_t *code, float *y) {
    const __m512 vscale = _mm512_set1_ps(p->scale);
    for (int64_t m0 = 0; m0 < p->M; m0 += ROW_CHUNK) {
        const int mc = p->M - m0 < ROW_CHUNK ? (int)(p->M - m0) : ROW_CHUNK, nv = (mc + 31) / 32;
        _Alignas(64) uint32_t acc[ROW_CHUNK];
        memset(acc, 0, sizeof acc);
        for (int64_t c0 = 0; c0 < p->C; c0 += ROW_FLUSH) {
            const int64_t c1 = p->C - c0 < ROW_FLUSH ? p->C : c0 + ROW_FLUSH;
            __m512i a16[ROW_CHUNK / 32];
            for (int k = 0; k < ROW_CHUNK / 32; k++) a16[k] = _mm512_setzero_si512();
            for (int64_t c = c0; c < c1; c++) {
                const uint8_t *t = row_table(p, c, code) + m0;
                for (int k = 0; k < ROW_CHUNK / 32; k++)
                    if (k < nv)
                        a16[k] = _mm512_add_epi16(a16[k], _mm512_cvtepu8_epi16(_mm256_loadu_si256((const __m256i *)(const void *)(t + 32 * k))));
            }
            for (int k = 0; k < nv; k++) {
                __m512i *a = (__m512i *)(void *)(acc + 32 * k);
                a[0] = _mm512_add_epi32(a[0], _mm512_cvtepu16_epi32(_mm512_castsi512_si256(a16[k])));
                a[1] = _mm512_add_epi32(a[1], _mm512_cvtepu16_epi32(_mm512_extracti64x4_epi64(a16[k], 1)));
            }
        }
        for (int i = 0; i < mc; i += 16) {
            const __mmask16 lanes = (__mmask16)(mc - i >= 16 ? 0xFFFFu : (1u << (mc - i)) - 1u);
            const __m512 base = _mm512_maskz_loadu_ps(lanes, p->base + m0 + i);
            const __m512 v = dequantise_avx512(p, _mm512_load_si512((const void *)(acc + i)), vscale, base);
            _mm512_mask_storeu_ps(y + m0 + i, lanes, v);
        }
    }
}

static void (*const ROW_SCANS[LUT_NUM_PATHS])(const lut_plan *, const uint8_t *, float *) = {
    scan_row_scalar, scan_row_avx2, scan_row_avx512};

/* ------------------------------------------------------------------------------------ */
/* drivers                                                                               */

typedef struct {
    int layout;
    void (*encode)(const lut_plan *, rows_view rows_in, int rows, uint8_t *blk);
    void (*scan)(const lut_plan *, const uint8_t *blk, int rows, float *Y, uint32_t *scratch);
} path_ops;

/* indexed by LUT_PATH_*; a path is only used once lut_resolve_path found it supported; all
 * of them read the plan's one table layout */
static const path_ops PATH_OPS[LUT_NUM_PATHS] = {
    {LAYOUT_COLUMN, encode_block_scalar, scan_block_scalar},
    {LAYOUT_COLUMN, encode_block_avx2, scan_block_avx2},
    {LAYOUT_GROUP, encode_block_avx512, scan_block_avx512},
};

enum { MODE_ENCODE, MODE_SCAN, MODE_APPLY };

#define STACK_BLK 16384 /* a block's codes live on the stack up to C = 256 */

/* The heap scratch of one call on resolved path rp, in two 64-byte aligned pieces: the block's
 * codes when they outgrow STACK_BLK (blk_heap_bytes), then, for dimension-major output
 * (columns: ldy > 0) on the paths that scan row-major, one block's outputs, which are then
 * transposed into place. */
static size_t blk_heap_bytes(const lut_plan *p) {
    const size_t blk_bytes = (size_t)p->Cq * 4 * BLOCK;
    return blk_bytes > STACK_BLK ? round64(blk_bytes) : 0;
}
static size_t work_bytes(const lut_plan *p, int rp, int columns) {
    const size_t rowwise = columns && rp != LUT_PATH_AVX512 ? round64(sizeof(float) * (size_t)(BLOCK * p->M)) : 0;
    return blk_heap_bytes(p) + rowwise;
}

size_t lut_apply_columns_work(const lut_plan *plan, int path) {
    const int rp = lut_resolve_path(path, NULL, 0);
    if (!plan || plan->M == 0 || rp < 0) return 0;
    return work_bytes(plan, rp, 1);
}

/* X's rows are read through (x_row_stride, x_col_stride): see rows_view.  work[work_len]:
 * the caller's scratch (lut_apply_columns); when it is NULL, too small or not 64-byte aligned,
 * the call allocates its own. */
static int run_blocks(int mode, const lut_plan *p, const float *X, int64_t x_row_stride,
                      int64_t x_col_stride, const uint8_t *codes_in, int64_t N, uint8_t *codes_out,
                      float *Y, int64_t ldy, void *work, size_t work_len, int path, char *err,
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

    const path_ops *ops = &PATH_OPS[rp];
    const int64_t M = p->M, C = p->C;
    _Alignas(64) uint8_t stack_blk[STACK_BLK];
    _Alignas(64) uint32_t scratch[AVX2_OUTS * 4 * 8];
    /* dimension-major output (ldy > 0): AVX-512 stores it straight from its accumulators;
     * the other paths scan a block row-major into `rowwise`, then transpose it */
    const size_t need = work_bytes(p, rp, ldy > 0);
    uint8_t *heap = NULL;
    if (need > 0 && (!work || work_len < need || ((uintptr_t)work & 63) != 0)) {
        heap = (uint8_t *)alloc64(need);
        if (!heap) return set_err(err, errlen, LUT_ENOMEM, "%s: out of memory (%zu bytes)", fn, need);
        work = heap;
    }
    const size_t blk_heap = blk_heap_bytes(p);
    uint8_t *blk = blk_heap ? (uint8_t *)work : stack_blk;
    float *rowwise = need > blk_heap ? (float *)(void *)((uint8_t *)work + blk_heap) : NULL;
    if (mode != MODE_ENCODE && ldy == 0 && N <= ROW_PATH_MAX_N && p->tabT) { /* blk holds >= C bytes */
        for (int64_t n = 0; n < N; n++) {
            const uint8_t *code = codes_in ? codes_in + n * C : blk;
            if (!codes_in)
                for (int64_t c = 0; c < C; c++) blk[c] = walk_scalar(p, c, X + n * x_row_stride, x_col_stride);
            ROW_SCANS[rp](p, code, Y + n * M);
        }
        free(heap);
        return LUT_OK;
    }
    for (int64_t n0 = 0; n0 < N; n0 += BLOCK) {
        const int rows = N - n0 < BLOCK ? (int)(N - n0) : BLOCK;
        if (mode == MODE_SCAN)
            codes_to_blk(p, ops->layout, codes_in + n0 * C, rows, blk);
        else
            ops->encode(p, (rows_view){X + n0 * x_row_stride, x_row_stride, x_col_stride}, rows, blk);
        if (mode == MODE_ENCODE)
            blk_to_codes(p, ops->layout, blk, rows, codes_out + n0 * C);
        else if (ldy == 0)
            ops->scan(p, blk, rows, Y + n0 * M, scratch);
        else if (rp == LUT_PATH_AVX512)
            scan_block_avx512_columns(p, blk, rows, Y + n0, ldy);
        else {
            ops->scan(p, blk, rows, rowwise, scratch);
            for (int64_t m = 0; m < M; m++)
                for (int r = 0; r < rows; r++) Y[m * ldy + n0 + r] = rowwise[(int64_t)r * M + m];
        }
    }
    free(heap);
    return LUT_OK;
}

int lut_encode(const lut_plan *plan, const float *X, int64_t N, uint8_t *codes, int path,
               char *err, size_t errlen) {
    return run_blocks(MODE_ENCODE, plan, X, plan ? plan->D : 0, 1, NULL, N, codes, NULL, 0, NULL, 0, path,
                      err, errlen);
}

int lut_scan(const lut_plan *plan, const uint8_t *codes, int64_t N, float *Y, int path,
             char *err, size_t errlen) {
    return run_blocks(MODE_SCAN, plan, NULL, 0, 0, codes, N, NULL, Y, 0, NULL, 0, path, err, errlen);
}

int lut_apply(const lut_plan *plan, const float *X, int64_t N, float *Y, int path, char *err,
              size_t errlen) {
    return run_blocks(MODE_APPLY, plan, X, plan ? plan->D : 0, 1, NULL, N, NULL, Y, 0, NULL, 0, path, err,
                      errlen);
}

int lut_apply_columns(const lut_plan *plan, const float *Xt, int64_t ldx, int64_t N, float *Yt,
                      int64_t ldy, void *work, size_t work_len, int path, char *err, size_t errlen) {
    if (ldx < N || ldx < 1 || ldy < N || ldy < 1)
        return set_err(err, errlen, LUT_EINVAL,
                       "lut_apply_columns: ldx = %lld and ldy = %lld must be >= max(N = %lld, 1)",
                       (long long)ldx, (long long)ldy, (long long)N);
    return run_blocks(MODE_APPLY, plan, Xt, 1, ldx, NULL, N, NULL, Yt, ldy, work, work_len, path, err, errlen);
}
