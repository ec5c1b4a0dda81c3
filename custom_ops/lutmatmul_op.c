/*
 * lutmatmul_op.c: the onnxruntime custom op LutMatMul (domain ai.lutcompile, version 1).
 *
 * onnxruntime loads the shared library lutcompile/_lutops*.so with
 * SessionOptions.register_custom_ops_library(path) and calls RegisterCustomOps below.
 * Kernel creation reads and validates every attribute (docs/lutmatmul.md) into a lut_plan;
 * compute checks the input (float32, rank >= 1, last dim D), allocates Y = X.shape[:-1] + [M]
 * and runs lut_apply over row blocks split across onnxruntime's intra-op thread pool.
 * Rows are independent, so the result does not depend on the thread count.
 *
 * Only the C ABI in ort_abi.h is used (API version 17).
 */
#include <limits.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "lutconv.h"
#include "lutkernel.h"
#include "ort_abi.h"
#include "spnkernel.h"

#define LUT_EXPORT __attribute__((visibility("default")))

static const char LUT_DOMAIN[] = "ai.lutcompile";
static const char LUT_OP_NAME[] = "LutMatMul";
static const char LUT_CONV_OP_NAME[] = "LutConv";
static const char SPN_OP_NAME[] = "SpnMatMul";
static const char SPN_CONV_OP_NAME[] = "SpnConv";

/* Rows handed to one thread-pool task: about TASK_WORK units of work, counting M*C table
 * lookups per row for the scan and ENCODE_COST units per codebook and row for the encode
 * (measured on Zen 4: encoding a codebook costs about as much as 100-150 lookups).  Tasks
 * are whole 64-row blocks; with at most one task (tiny N, e.g. batch 1) the kernel runs
 * inline and the thread pool is not touched. */
#define TASK_WORK (1 << 18)
#define ENCODE_COST 128
#define ROW_ALIGN 64

typedef struct LutKernel {
    const OrtApi *api;
    lut_plan *plan;
    lut_conv *conv; /* LutConv only: the patch encoder */
    int conv_requested;
    int path;
    int64_t D, M, C;
    char label[320]; /* "LutMatMul node 'NAME'" (a long name is cut), the prefix of every error */
} LutKernel;

typedef struct OpDefinition {
    OrtCustomOp op;
    void *reserved[8]; /* zero-filled room after the version-17 struct */
} OpDefinition;
static const OpDefinition g_lutconv;
static const OpDefinition g_spnmatmul;
static const OpDefinition g_spnconv;
static const char *ORT_API_CALL op_get_name(const OrtCustomOp *op);

/* ------------------------------------------------------------------------------------ */
/* status helpers                                                                        */

static OrtStatus *make_status(const OrtApi *api, OrtErrorCode code, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));

static OrtStatus *make_status(const OrtApi *api, OrtErrorCode code, const char *fmt, ...) {
    char msg[1024];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(msg, sizeof msg, fmt, ap);
    va_end(ap);
    return api->CreateStatus(code, msg);
}

/* wrap an onnxruntime error about attribute `name` into our own message */
static OrtStatus *attr_error(const OrtApi *api, const char *label, const char *name,
                             const char *kind, OrtStatus *st) {
    OrtStatus *r = make_status(api, ORT_INVALID_ARGUMENT,
                               "%s: attribute '%s' (%s) is missing or malformed: %s", label, name, kind,
                               api->GetErrorMessage(st));
    api->ReleaseStatus(st);
    return r;
}

static const char *element_type_name(int t) {
    static const char *const names[] = {
        "undefined", "float32", "uint8", "int8", "uint16", "int16", "int32", "int64",
        "string", "bool", "float16", "float64 (double)", "uint32", "uint64", "complex64",
        "complex128", "bfloat16", "float8e4m3fn", "float8e4m3fnuz", "float8e5m2",
        "float8e5m2fnuz"};
    if (t >= 0 && t < (int)(sizeof names / sizeof names[0])) return names[t];
    return "an unsupported element type";
}

/* ------------------------------------------------------------------------------------ */
/* attribute readers                                                                     */

static OrtStatus *read_int(const OrtApi *api, const OrtKernelInfo *info, const char *label,
                           const char *name, int64_t *out) {
    OrtStatus *st = api->KernelInfoGetAttribute_int64(info, name, out); /* [86] */
    return st ? attr_error(api, label, name, "int", st) : NULL;
}

static OrtStatus *read_float(const OrtApi *api, const OrtKernelInfo *info, const char *label,
                             const char *name, float *out) {
    OrtStatus *st = api->KernelInfoGetAttribute_float(info, name, out); /* [85] */
    return st ? attr_error(api, label, name, "float", st) : NULL;
}

static OrtStatus *read_ints(const OrtApi *api, const OrtKernelInfo *info, const char *label,
                            const char *name, int64_t **out, size_t *count) {
    size_t n = 0;
    *out = NULL;
    *count = 0;
    OrtStatus *st = api->KernelInfoGetAttributeArray_int64(info, name, NULL, &n); /* [163] */
    if (st) return attr_error(api, label, name, "ints", st);
    int64_t *buf = (int64_t *)malloc((n ? n : 1) * sizeof(int64_t));
    if (!buf) return make_status(api, ORT_FAIL, "%s: out of memory reading '%s'", label, name);
    size_t got = n;
    if (n) {
        st = api->KernelInfoGetAttributeArray_int64(info, name, buf, &got);
        if (st) {
            free(buf);
            return attr_error(api, label, name, "ints", st);
        }
    }
    *out = buf;
    *count = got < n ? got : n;
    return NULL;
}

/* The error st of reading an optional attribute: NULL (st released) when the attribute is
 * absent, else our error.  onnxruntime reports a missing attribute and one of another type
 * alike; only the second names the type ("don't match"), and that one is an error. */
static OrtStatus *optional_attr_error(const OrtApi *api, const char *label, const char *name, const char *kind,
                                      OrtStatus *st) {
    if (strstr(api->GetErrorMessage(st), "don't match")) return attr_error(api, label, name, kind, st);
    api->ReleaseStatus(st);
    return NULL;
}

/* An ints attribute the node may leave out: *out stays NULL when it is absent. */
static OrtStatus *read_optional_ints(const OrtApi *api, const OrtKernelInfo *info, const char *label,
                                     const char *name, int64_t **out, size_t *count) {
    size_t n = 0;
    *out = NULL;
    *count = 0;
    OrtStatus *st = api->KernelInfoGetAttributeArray_int64(info, name, NULL, &n); /* [163] */
    if (st) return optional_attr_error(api, label, name, "ints", st);
    return read_ints(api, info, label, name, out, count);
}

/* An int attribute the node may leave out: `fallback` when it is absent. */
static OrtStatus *read_optional_int(const OrtApi *api, const OrtKernelInfo *info, const char *label,
                                    const char *name, int64_t fallback, int64_t *out) {
    OrtStatus *st = api->KernelInfoGetAttribute_int64(info, name, out); /* [86] */
    if (!st) return NULL;
    *out = fallback;
    return optional_attr_error(api, label, name, "int", st);
}

static OrtStatus *read_floats(const OrtApi *api, const OrtKernelInfo *info, const char *label,
                              const char *name, float **out, size_t *count) {
    size_t n = 0;
    *out = NULL;
    *count = 0;
    OrtStatus *st = api->KernelInfoGetAttributeArray_float(info, name, NULL, &n); /* [162] */
    if (st) return attr_error(api, label, name, "floats", st);
    float *buf = (float *)malloc((n ? n : 1) * sizeof(float));
    if (!buf) return make_status(api, ORT_FAIL, "%s: out of memory reading '%s'", label, name);
    size_t got = n;
    if (n) {
        st = api->KernelInfoGetAttributeArray_float(info, name, buf, &got);
        if (st) {
            free(buf);
            return attr_error(api, label, name, "floats", st);
        }
    }
    *out = buf;
    *count = got < n ? got : n;
    return NULL;
}

/* A uint8 tensor attribute of `rank` dims equal to want[] (its shape spelt `shape` in
 * messages): *value holds it (the caller releases it), *data its bytes. */
static OrtStatus *read_u8_tensor(const OrtApi *api, const OrtKernelInfo *info, const char *label,
                                 const char *name, const char *shape, const int64_t *want, size_t rank,
                                 OrtValue **value, const void **data) {
    OrtAllocator *allocator = NULL;
    OrtTensorTypeAndShapeInfo *tinfo = NULL;
    OrtStatus *st = NULL;
    *value = NULL;
    if ((st = api->GetAllocatorWithDefaultOptions(&allocator))) return st; /* [78] */
    if ((st = api->KernelInfoGetAttribute_tensor(info, name, allocator, value))) { /* [236] */
        *value = NULL;
        char kind[64];
        snprintf(kind, sizeof kind, "tensor uint8 %s", shape);
        return attr_error(api, label, name, kind, st);
    }
    if ((st = api->GetTensorTypeAndShape(*value, &tinfo))) goto done; /* [65] */
    ONNXTensorElementDataType et = ONNX_TENSOR_ELEMENT_DATA_TYPE_UNDEFINED;
    if ((st = api->GetTensorElementType(tinfo, &et))) goto done; /* [60] */
    if (et != ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT8) {
        st = make_status(api, ORT_INVALID_ARGUMENT, "%s: attribute '%s' must be a uint8 tensor, got %s", label, name,
                         element_type_name((int)et));
        goto done;
    }
    size_t got_rank = 0;
    if ((st = api->GetDimensionsCount(tinfo, &got_rank))) goto done; /* [61] */
    int64_t dims[8] = {0};
    if (got_rank == rank && (st = api->GetDimensions(tinfo, dims, rank))) goto done; /* [62] */
    int same = got_rank == rank;
    for (size_t i = 0; same && i < rank; i++) same = dims[i] == want[i];
    if (!same) {
        char expected[128] = "", found[128] = "";
        for (size_t i = 0; i < rank; i++)
            snprintf(expected + strlen(expected), sizeof expected - strlen(expected), "%s%lld", i ? ", " : "",
                     (long long)want[i]);
        if (got_rank == rank)
            for (size_t i = 0; i < rank; i++)
                snprintf(found + strlen(found), sizeof found - strlen(found), "%s%lld", i ? ", " : "", (long long)dims[i]);
        st = got_rank == rank
                 ? make_status(api, ORT_INVALID_ARGUMENT, "%s: attribute '%s' must have shape %s = [%s], got [%s]",
                               label, name, shape, expected, found)
                 : make_status(api, ORT_INVALID_ARGUMENT, "%s: attribute '%s' must have shape %s = [%s], got a "
                               "rank-%zu tensor", label, name, shape, expected, got_rank);
        goto done;
    }
    void *bytes = NULL;
    if ((st = api->GetTensorMutableData(*value, &bytes))) goto done; /* [51] */
    *data = bytes;
done:
    if (tinfo) api->ReleaseTensorTypeAndShapeInfo(tinfo); /* [99] */
    if (st && *value) {
        api->ReleaseValue(*value); /* [96] */
        *value = NULL;
    }
    return st;
}

/* ------------------------------------------------------------------------------------ */
/* kernel creation                                                                       */

static void ORT_API_CALL lut_kernel_destroy(void *op_kernel) {
    LutKernel *k = (LutKernel *)op_kernel;
    if (!k) return;
    lut_plan_destroy(k->plan);
    lut_conv_destroy(k->conv);
    free(k);
}

/* A conv op's geometry attributes (in_channels, kernel_shape, strides, pads, dilations) into
 * *conv with lut_conv_create, which checks them against D and the split dims (see lutconv.h). */
static OrtStatus *read_conv(const OrtApi *api, const OrtKernelInfo *info, const char *label, int64_t D, int64_t C,
                            const int64_t *split, int64_t n_split, lut_conv **conv) {
    OrtStatus *st = NULL;
    int64_t cin = 0, *arrays[4] = {NULL, NULL, NULL, NULL};
    size_t counts[4] = {0, 0, 0, 0};
    static const char *const names[4] = {"kernel_shape", "strides", "pads", "dilations"};
    static const size_t expected[4] = {2, 2, 4, 2};
    if ((st = read_int(api, info, label, "in_channels", &cin))) return st;
    for (int i = 0; i < 4 && !st; i++) {
        if ((st = read_ints(api, info, label, names[i], &arrays[i], &counts[i]))) break;
        if (counts[i] != expected[i])
            st = make_status(api, ORT_INVALID_ARGUMENT, "%s: attribute '%s' must have %zu values, got %zu",
                             label, names[i], expected[i], counts[i]);
    }
    char err[512];
    if (!st) {
        int rc = lut_conv_create(conv, cin, arrays[0], arrays[1], arrays[2], arrays[3], D, C, split,
                                 n_split, err, sizeof err);
        if (rc != LUT_OK)
            st = make_status(api, rc == LUT_ENOMEM ? ORT_FAIL : ORT_INVALID_ARGUMENT, "%s: %s", label, err);
    }
    for (int i = 0; i < 4; i++) free(arrays[i]);
    return st;
}

/* LutConv's geometry attributes, checked against the tree arrays (see lutconv.h). */
static OrtStatus *build_conv(LutKernel *k, const OrtKernelInfo *info, int64_t D, int64_t C,
                             const int64_t *split, int64_t n_split) {
    const OrtApi *api = k->api;
    char err[512];
    OrtStatus *st = read_conv(api, info, k->label, D, C, split, n_split, &k->conv);
    /* optional: a fused MaxPool, [window h, w, stride h, w] */
    int64_t *pool = NULL;
    size_t n_pool = 0;
    if (!st && (st = read_optional_ints(api, info, k->label, "max_pool", &pool, &n_pool)) == NULL && pool) {
        if (n_pool != 4)
            st = make_status(api, ORT_INVALID_ARGUMENT, "%s: attribute 'max_pool' must have 4 values "
                             "(window h, w, stride h, w), got %zu", k->label, n_pool);
        else if (lut_conv_set_pool(k->conv, pool, pool + 2, err, sizeof err) != LUT_OK)
            st = make_status(api, ORT_INVALID_ARGUMENT, "%s: %s", k->label, err);
    }
    free(pool);
    return st;
}

/* Everything that can fail; on success k->plan (and for LutConv k->conv) is set.  tables are
 * read last.  Each attribute is validated once: the geometry and split dims by lut_conv_create
 * (LutConv), everything else by the one lut_plan_create. */
static OrtStatus *build_plan(LutKernel *k, const OrtKernelInfo *info) {
    const OrtApi *api = k->api;
    const char *label = k->label;
    OrtStatus *st = NULL;
    int64_t D = 0, M = 0, C = 0, K = 0, relu = 0;
    float scale = 0.0f;
    int64_t *split = NULL;
    float *thresholds = NULL, *offsets = NULL, *bias = NULL;
    size_t n_split = 0, n_thr = 0, n_off = 0, n_bias = 0;
    OrtValue *tables = NULL;
    const void *tdata = NULL;

    if ((st = read_int(api, info, label, "D", &D))) goto done;
    if ((st = read_int(api, info, label, "M", &M))) goto done;
    if ((st = read_int(api, info, label, "C", &C))) goto done;
    if ((st = read_int(api, info, label, "K", &K))) goto done;
    if ((st = read_int(api, info, label, "relu", &relu))) goto done;
    if ((st = read_float(api, info, label, "scale", &scale))) goto done;
    if ((st = read_ints(api, info, label, "split_dims", &split, &n_split))) goto done;
    if ((st = read_floats(api, info, label, "thresholds", &thresholds, &n_thr))) goto done;
    if ((st = read_floats(api, info, label, "offsets", &offsets, &n_off))) goto done;
    if ((st = read_floats(api, info, label, "bias", &bias, &n_bias))) goto done;
    /* the sizes are checked before the table shape so the message names the culprit */
    char err[512];
    if (lut_check_sizes(D, M, C, K, err, sizeof err) != LUT_OK) {
        st = make_status(api, ORT_INVALID_ARGUMENT, "%s: %s", label, err);
        goto done;
    }

    {
        const int64_t want[3] = {M, C, LUT_K};
        if ((st = read_u8_tensor(api, info, label, "tables", "[M, C, 16]", want, 3, &tables, &tdata))) goto done;
    }

    /* LutConv runs the plan over the gathered split pixels (lutconv.h): U columns, the split
     * dims renumbered to them */
    int64_t plan_D = D;
    const int64_t *plan_split = split;
    if (k->conv_requested) {
        if ((st = build_conv(k, info, D, C, split, (int64_t)n_split))) goto done;
        plan_D = lut_conv_columns(k->conv);
        plan_split = lut_conv_split_columns(k->conv);
    }
    const int64_t n_tables = M * C * LUT_K; /* the dims, which lut_check_sizes bounded */
    int rc = lut_plan_create(&k->plan, plan_D, M, C, K, plan_split, (int64_t)n_split, thresholds,
                             (int64_t)n_thr, (const uint8_t *)tdata, n_tables, scale, offsets,
                             (int64_t)n_off, bias, (int64_t)n_bias, relu, err, sizeof err);
    if (rc != LUT_OK) {
        st = make_status(api, rc == LUT_ENOMEM ? ORT_FAIL : ORT_INVALID_ARGUMENT,
                         "%s: %s", label, err);
        goto done;
    }
    k->D = D;
    k->M = M;
    k->C = C;

done:
    if (tables) api->ReleaseValue(tables); /* [96] */
    free(split);
    free(thresholds);
    free(offsets);
    free(bias);
    return st;
}

/* What every op's kernel creation does first: the label "OP node 'NAME'" that starts every
 * error (without a name, "... node '?'"), one input and one output, and the kernel path. */
static OrtStatus *kernel_common(const OrtCustomOp *op, const OrtApi *api, const OrtKernelInfo *info, char *label,
                                size_t label_len, int *path) {
    const char *op_name = op_get_name(op);
    snprintf(label, label_len, "%s node '?'", op_name);
    size_t size = 0;
    OrtStatus *st = api->KernelInfo_GetNodeName(info, NULL, &size); /* [244] */
    char *name = !st && size > 0 ? (char *)malloc(size) : NULL;
    if (name) st = api->KernelInfo_GetNodeName(info, name, &size);
    if (st)
        api->ReleaseStatus(st);
    else if (name)
        snprintf(label, label_len, "%s node '%.256s%s'", op_name, name, strlen(name) > 256 ? "..." : "");
    free(name);
    size_t n_in = 0, n_out = 0;
    if ((st = api->KernelInfo_GetInputCount(info, &n_in)) ||   /* [230] */
        (st = api->KernelInfo_GetOutputCount(info, &n_out)))   /* [231] */
        return st;
    if (n_in != 1 || n_out != 1)
        return make_status(api, ORT_INVALID_ARGUMENT, "%s: expects exactly 1 input (X) and 1 output (Y), got %zu and %zu",
                           label, n_in, n_out);
    char err[256];
    *path = lut_resolve_path(LUT_PATH_AUTO, err, sizeof err);
    return *path < 0 ? make_status(api, ORT_INVALID_ARGUMENT, "%s: %s", label, err) : NULL;
}

/* The rest of kernel creation, shared: kernel_common, then the op's own `build`; on failure
 * the half-built kernel goes to `destroy`. */
static OrtStatus *finish_kernel(const OrtCustomOp *op, const OrtApi *api, const OrtKernelInfo *info, void *k,
                                char *label, size_t label_len, int *path,
                                OrtStatus *(*build)(void *, const OrtKernelInfo *), void (*destroy)(void *),
                                void **kernel) {
    OrtStatus *st = kernel_common(op, api, info, label, label_len, path);
    if (!st) st = build(k, info);
    if (st) {
        destroy(k);
        return st;
    }
    *kernel = k;
    return NULL;
}

static OrtStatus *build_lut(void *k, const OrtKernelInfo *info) { return build_plan((LutKernel *)k, info); }

static OrtStatus *ORT_API_CALL lut_create_kernel(const OrtCustomOp *op, const OrtApi *api,
                                                 const OrtKernelInfo *info, void **kernel) {
    *kernel = NULL;
    LutKernel *k = (LutKernel *)calloc(1, sizeof *k);
    if (!k) return api->CreateStatus(ORT_FAIL, "LutMatMul: out of memory creating the kernel");
    k->api = api;
    k->conv_requested = op == &g_lutconv.op;
    return finish_kernel(op, api, info, k, k->label, sizeof k->label, &k->path, build_lut, lut_kernel_destroy, kernel);
}

/* ------------------------------------------------------------------------------------ */
/* compute                                                                               */

typedef struct Job {
    const lut_plan *plan;
    const spn_plan *spn; /* SpnMatMul: set instead of plan */
    const float *X;
    float *Y;
    int64_t N, D, M, rows_per_task;
    int path;
    int failed;
    char err[256];
} Job;

static void run_task(void *arg, size_t index) {
    Job *job = (Job *)arg;
    const int64_t r0 = (int64_t)index * job->rows_per_task;
    if (r0 >= job->N) return;
    const int64_t rows = job->N - r0 < job->rows_per_task ? job->N - r0 : job->rows_per_task;
    char err[256];
    int rc = job->spn ? spn_apply(job->spn, job->X + r0 * job->D, rows, job->Y + r0 * job->M, job->path, err, sizeof err)
                      : lut_apply(job->plan, job->X + r0 * job->D, rows, job->Y + r0 * job->M, job->path,
                                  err, sizeof err);
    if (rc != LUT_OK && __atomic_exchange_n(&job->failed, 1, __ATOMIC_ACQ_REL) == 0)
        memcpy(job->err, err, sizeof err);
}

/* LutConv: the work items are (image, tile of CONV_TILE output positions); each gathers the
 * split pixels of its patches straight from the image into P[U][tile] and applies the plan
 * (SIMD encode and scan) to it, writing the outputs straight into NCHW.  Workers claim items
 * from a shared counter until none is left, each through one scratch buffer (P and the
 * kernel's work, lut_apply_columns_work) allocated on its first item and freed when it runs
 * out: one allocation per worker and call, not per tile.  The thread pool is handed one task
 * per item, so every one of its threads can become a worker whatever their number; the tasks
 * that start after the counter ran out return at once.  Which worker computes an item does
 * not change its result. */
#define CONV_TILE 64
#define CONV_LD (CONV_TILE + 16) /* a gathered column, with lut_conv_gather's slack */

typedef struct ConvJob {
    const LutKernel *k;
    const float *X;
    const int32_t *index; /* lut_conv_index of this call's H x W */
    float *Y;
    int64_t H, W, in_image, positions, tiles, items;
    /* with a fused MaxPool: items are (image, band of `band` pooled rows) of PH x PW; a worker
     * computes the band's convolution rows into S[M][s_ld] (at most s_ld positions), then pools */
    int64_t OW, PH, PW, band, bands, s_ld;
    size_t p_bytes, work_bytes, s_bytes; /* a worker's scratch: P[U][CONV_LD], the kernel's work, S */
    int64_t next;               /* the next item to claim */
    int failed;
    char err[256];
} ConvJob;

static void conv_fail(ConvJob *job, const char *err) {
    if (__atomic_exchange_n(&job->failed, 1, __ATOMIC_ACQ_REL) == 0) snprintf(job->err, sizeof job->err, "%s", err);
}

/* Output positions first .. first+rows-1 (rows <= CONV_TILE) of image n: their split pixels
 * gathered into P (the scratch's start), looked up into Yt[m*ldy + r].  0 with `err` set on failure. */
static int conv_tile(const ConvJob *job, int64_t n, int64_t first, int64_t rows, uint8_t *scratch, float *Yt,
                     int64_t ldy, char *err, size_t errlen) {
    const LutKernel *k = job->k;
    float *P = (float *)(void *)scratch;
    lut_conv_gather(k->conv, job->X + n * job->in_image, job->H, job->W, job->index, first, rows, CONV_LD, k->path, P);
    return lut_apply_columns(k->plan, P, CONV_LD, rows, Yt, ldy, scratch + job->p_bytes, job->work_bytes, k->path, err,
                             errlen) == LUT_OK;
}

/* One (image, band of pooled rows) item of a LutConv with a fused MaxPool: the convolution
 * rows the band's windows read, CONV_TILE positions at a time, into S (the scratch after P and
 * the kernel's work), then the pooled rows into Y.  0 with `err` set on failure. */
static int pool_band(const ConvJob *job, int64_t item, uint8_t *scratch, char *err, size_t errlen) {
    const LutKernel *k = job->k;
    const int64_t n = item / job->bands, py0 = item % job->bands * job->band;
    const int64_t py1 = py0 + job->band < job->PH ? py0 + job->band : job->PH;
    int64_t r0 = 0, r1 = 0;
    lut_conv_pool_rows(k->conv, py0, py1, &r0, &r1);
    const int64_t first = r0 * job->OW, count = (r1 - r0) * job->OW; /* count <= s_ld */
    float *S = (float *)(void *)(scratch + job->p_bytes + job->work_bytes);
    for (int64_t t = 0; t < count; t += CONV_TILE)
        if (!conv_tile(job, n, first + t, count - t < CONV_TILE ? count - t : CONV_TILE, scratch, S + t, job->s_ld, err,
                       errlen))
            return 0;
    const int64_t pooled = job->PH * job->PW;
    lut_conv_pool(k->conv, S, job->s_ld, k->M, job->OW, py0, py1, job->PW,
                  job->Y + n * k->M * pooled + py0 * job->PW, pooled, k->path);
    return 1;
}

static void run_conv_worker(void *arg, size_t task) {
    (void)task; /* tasks are interchangeable: see above */
    ConvJob *job = (ConvJob *)arg;
    const LutKernel *k = job->k;
    uint8_t *scratch = NULL;
    char err[256];
    while (!__atomic_load_n(&job->failed, __ATOMIC_ACQUIRE)) {
        const int64_t item = __atomic_fetch_add(&job->next, 1, __ATOMIC_RELAXED);
        if (item >= job->items) break;
        if (!scratch && !(scratch = (uint8_t *)aligned_alloc(64, job->p_bytes + job->work_bytes + job->s_bytes))) {
            conv_fail(job, "out of memory for a worker's patch buffer");
            break;
        }
        int ok;
        if (job->bands) {
            ok = pool_band(job, item, scratch, err, sizeof err);
        } else {
            const int64_t n = item / job->tiles, first = item % job->tiles * CONV_TILE;
            const int64_t rows = job->positions - first < CONV_TILE ? job->positions - first : CONV_TILE;
            ok = conv_tile(job, n, first, rows, scratch, job->Y + n * k->M * job->positions + first, job->positions,
                           err, sizeof err);
        }
        if (!ok) {
            conv_fail(job, err);
            break;
        }
    }
    free(scratch);
}

/* `items` work items of `job`: inline when there is one, else over onnxruntime's pool; then
 * the first failure a worker recorded (*failed, err) as the op's error. */
static OrtStatus *run_items(const OrtApi *api, OrtKernelContext *ctx, const char *label, void (*fn)(void *, size_t),
                            void *job, int64_t items, const int *failed, const char *err) {
    if (items <= 1) {
        fn(job, 0);
    } else {
        OrtStatus *st = api->KernelContext_ParallelFor(ctx, fn, (size_t)items, 0, job); /* [274] */
        if (st) return st;
    }
    return *failed ? make_status(api, ORT_FAIL, "%s: %s", label, err) : NULL;
}

/* The pixel offsets of each patch column for this input size (lut_conv_index_for), after
 * checking that an image fits their int32; *owned, when set, is the caller's to free. */
static OrtStatus *patch_index(const OrtApi *api, lut_conv *conv, const char *label, const int64_t *dims,
                              int64_t positions, const int32_t **index, int32_t **owned) {
    if (!lut_conv_index_fits(conv, dims[2], dims[3]))
        return make_status(api, ORT_INVALID_ARGUMENT, "%s: an image of %lld x %lld x %lld exceeds 2^31 values",
                           label, (long long)dims[1], (long long)dims[2], (long long)dims[3]);
    *index = lut_conv_index_for(conv, dims[2], dims[3], owned);
    return *index ? NULL : make_status(api, ORT_FAIL, "%s: out of memory for the patch index (%lld x %lld offsets)",
                                       label, (long long)lut_conv_columns(conv), (long long)positions);
}

/* A conv op's input X checked against its geometry, and the convolution's output size. */
static OrtStatus *conv_output_size(const OrtApi *api, const lut_conv *conv, const char *label, int64_t M,
                                   const int64_t *dims, size_t rank, int64_t *OH, int64_t *OW) {
    if (rank != 4 || dims[1] != lut_conv_in_channels(conv))
        return make_status(api, ORT_INVALID_ARGUMENT, "%s: input X must have shape [N, %lld, H, W], got rank %zu%s",
                           label, (long long)lut_conv_in_channels(conv), rank,
                           rank == 4 ? " with another channel count" : "");
    if (dims[0] < 0 || dims[2] < 1 || dims[3] < 1 || dims[2] > LUT_CONV_MAX_SIDE || dims[3] > LUT_CONV_MAX_SIDE)
        return make_status(api, ORT_INVALID_ARGUMENT, "%s: input X of shape [%lld, %lld, %lld, %lld]: height and "
                           "width must lie in [1, %lld]", label, (long long)dims[0], (long long)dims[1],
                           (long long)dims[2], (long long)dims[3], (long long)LUT_CONV_MAX_SIDE);
    if (lut_conv_output_size(conv, dims[2], dims[3], OH, OW) != LUT_OK)
        return make_status(api, ORT_INVALID_ARGUMENT, "%s: input of %lld x %lld is smaller than the kernel",
                           label, (long long)dims[2], (long long)dims[3]);
    /* OH, OW <= 2^21 (lutconv.h), M <= 2^40: check N * M * OH * OW, step by step */
    if (dims[0] > 0 && (M > INT64_MAX / *OH / *OW || dims[0] > INT64_MAX / (M * *OH * *OW)))
        return make_status(api, ORT_INVALID_ARGUMENT, "%s: output [%lld, %lld, %lld, %lld] is too large", label,
                           (long long)dims[0], (long long)M, (long long)*OH, (long long)*OW);
    return NULL;
}

/* The output Y [out_dims], and the data of X and Y (left NULL when the batch is empty). */
static OrtStatus *nchw_output(const OrtApi *api, OrtKernelContext *ctx, const OrtValue *x, const int64_t out_dims[4],
                              const float **X, float **Y) {
    OrtValue *y = NULL;
    OrtStatus *st = api->KernelContext_GetOutput(ctx, 0, out_dims, 4, &y); /* [91] */
    if (st || out_dims[0] == 0) return st;
    void *xdata = NULL, *ydata = NULL;
    if ((st = api->GetTensorMutableData((OrtValue *)x, &xdata))) return st; /* [51] */
    if ((st = api->GetTensorMutableData(y, &ydata))) return st;
    *X = (const float *)xdata;
    *Y = (float *)ydata;
    return NULL;
}

static OrtStatus *conv_compute(LutKernel *k, OrtKernelContext *ctx, const OrtValue *x, const int64_t *dims,
                               size_t rank) {
    const OrtApi *api = k->api;
    int64_t OH = 0, OW = 0;
    OrtStatus *st = conv_output_size(api, k->conv, k->label, k->M, dims, rank, &OH, &OW);
    if (st) return st;
    int64_t PH = OH, PW = OW;
    if (lut_conv_pooled_size(k->conv, OH, OW, &PH, &PW) != LUT_OK)
        return make_status(api, ORT_INVALID_ARGUMENT, "%s: the convolution's output of %lld x %lld is smaller than "
                           "the fused max_pool window", k->label, (long long)OH, (long long)OW);
    const int64_t out_dims[4] = {dims[0], k->M, PH, PW};
    ConvJob job;
    memset(&job, 0, sizeof job);
    if ((st = nchw_output(api, ctx, x, out_dims, &job.X, &job.Y)) || dims[0] == 0) return st;
    job.k = k;
    job.H = dims[2];
    job.W = dims[3];
    job.in_image = dims[1] * dims[2] * dims[3];
    job.positions = OH * OW;
    job.tiles = (job.positions + CONV_TILE - 1) / CONV_TILE;
    job.items = dims[0] * job.tiles; /* <= N * M * OH * OW, checked above */
    if (lut_conv_pooled(k->conv)) {
        /* bands of pooled rows whose convolution rows hold about 2 * CONV_TILE positions */
        int64_t r0 = 0, r1 = 0;
        job.OW = OW;
        job.PH = PH;
        job.PW = PW;
        job.band = 1;
        while (job.band < PH) {
            lut_conv_pool_rows(k->conv, 0, job.band + 1, &r0, &r1);
            if ((r1 - r0) * OW > 2 * CONV_TILE) break;
            job.band++;
        }
        lut_conv_pool_rows(k->conv, 0, job.band, &r0, &r1);
        job.s_ld = (r1 - r0) * OW; /* <= max(pool window, 2 * CONV_TILE / OW) rows of OW <= 2^21 */
        job.bands = (PH + job.band - 1) / job.band;
        job.items = dims[0] * job.bands;
        if (job.s_ld > INT64_MAX / 4 / k->M || (uint64_t)(job.s_ld * k->M) > SIZE_MAX / 4 / 2)
            return make_status(api, ORT_INVALID_ARGUMENT, "%s: the fused max_pool's rows of %lld x %lld outputs "
                               "are too large", k->label, (long long)k->M, (long long)job.s_ld);
        job.s_bytes = (sizeof(float) * (size_t)(job.s_ld * k->M) + 63) & ~(size_t)63;
    }
    /* U <= 4C < 2^26 columns of CONV_LD floats, rounded to whole cache lines */
    job.p_bytes = (sizeof(float) * (size_t)(lut_conv_columns(k->conv) * CONV_LD) + 63) & ~(size_t)63;
    job.work_bytes = lut_apply_columns_work(k->plan, k->path);
    int32_t *owned = NULL;
    if ((st = patch_index(api, k->conv, k->label, dims, job.positions, &job.index, &owned))) return st;
    st = run_items(api, ctx, k->label, run_conv_worker, &job, job.items, &job.failed, job.err);
    free(owned);
    return st;
}

/* The input X, checked to be float32, and its dims in *dims (stack, of 8, or a malloc'd array
 * the caller frees when it is not `stack`). */
static OrtStatus *float_input(const OrtApi *api, OrtKernelContext *ctx, const char *label, const OrtValue **x,
                              int64_t **dims, size_t *rank, int64_t *stack) {
    OrtStatus *st = NULL;
    OrtTensorTypeAndShapeInfo *tinfo = NULL;
    *dims = stack;
    size_t n_in = 0;
    if ((st = api->KernelContext_GetInputCount(ctx, &n_in))) return st; /* [88] */
    if (n_in < 1 || (st = api->KernelContext_GetInput(ctx, 0, x)) || !*x) /* [90] */
        return st ? st : make_status(api, ORT_INVALID_ARGUMENT, "%s: input X is missing", label);
    if ((st = api->GetTensorTypeAndShape(*x, &tinfo))) return st; /* [65] */
    ONNXTensorElementDataType et = ONNX_TENSOR_ELEMENT_DATA_TYPE_UNDEFINED;
    if ((st = api->GetTensorElementType(tinfo, &et))) goto done; /* [60] */
    if (et != ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT) {
        st = make_status(api, ORT_INVALID_ARGUMENT, "%s: input X must be a float32 tensor (tensor(float)), got %s",
                         label, element_type_name((int)et));
        goto done;
    }
    if ((st = api->GetDimensionsCount(tinfo, rank))) goto done; /* [61] */
    if (*rank > 8 && !(*dims = (int64_t *)malloc(*rank * sizeof(int64_t)))) {
        *dims = stack;
        st = make_status(api, ORT_FAIL, "%s: out of memory", label);
        goto done;
    }
    st = api->GetDimensions(tinfo, *dims, *rank); /* [62] */
done:
    api->ReleaseTensorTypeAndShapeInfo(tinfo); /* [99] */
    return st;
}

/* A row-wise op's output: X [..., D] gives Y [..., M] (dims rewritten), allocated; *N rows. */
static OrtStatus *row_output(const OrtApi *api, OrtKernelContext *ctx, const char *label, const OrtValue *x,
                             int64_t *dims, size_t rank, int64_t D, int64_t M, const float **X, float **Y, int64_t *N) {
    OrtStatus *st = NULL;
    if (rank < 1)
        return make_status(api, ORT_INVALID_ARGUMENT, "%s: input X must have rank >= 1 (shape [..., D=%lld]), got a "
                           "scalar", label, (long long)D);
    if (dims[rank - 1] != D)
        return make_status(api, ORT_INVALID_ARGUMENT, "%s: input X has last dimension %lld, expected D=%lld", label,
                           (long long)dims[rank - 1], (long long)D);
    *N = 1;
    for (size_t i = 0; i + 1 < rank; i++) {
        if (dims[i] < 0 || (dims[i] > 0 && *N > INT64_MAX / dims[i]))
            return make_status(api, ORT_INVALID_ARGUMENT, "%s: invalid input shape", label);
        *N *= dims[i];
    }
    if (*N > 0 && M > INT64_MAX / *N) return make_status(api, ORT_INVALID_ARGUMENT, "%s: output too large", label);
    dims[rank - 1] = M; /* output shape: X.shape[:-1] + [M] */
    OrtValue *y = NULL;
    if ((st = api->KernelContext_GetOutput(ctx, 0, dims, rank, &y))) return st; /* [91] */
    if (*N == 0) return NULL;
    void *xdata = NULL, *ydata = NULL;
    if ((st = api->GetTensorMutableData((OrtValue *)x, &xdata))) return st; /* [51] */
    if ((st = api->GetTensorMutableData(y, &ydata))) return st;
    *X = (const float *)xdata;
    *Y = (float *)ydata;
    return NULL;
}

/* Rows split over onnxruntime's thread pool in tasks of about TASK_WORK units (per_row each),
 * whole ROW_ALIGN-row blocks; one task runs inline. */
static OrtStatus *run_rows(const OrtApi *api, OrtKernelContext *ctx, const char *label, Job *job, int64_t per_row) {
    int64_t rows = TASK_WORK / (per_row > 0 ? per_row : 1);
    rows = rows / ROW_ALIGN * ROW_ALIGN;
    job->rows_per_task = rows < ROW_ALIGN ? ROW_ALIGN : rows;
    const int64_t tasks = (job->N + job->rows_per_task - 1) / job->rows_per_task;
    return run_items(api, ctx, label, run_task, job, tasks, &job->failed, job->err);
}

/* A row-wise op's compute once its input is read: Y allocated, then job's rows run. */
static OrtStatus *rows_compute(const OrtApi *api, OrtKernelContext *ctx, const char *label, const OrtValue *x,
                               int64_t *dims, size_t rank, Job *job, int64_t per_row) {
    OrtStatus *st = row_output(api, ctx, label, x, dims, rank, job->D, job->M, &job->X, &job->Y, &job->N);
    return st || job->N == 0 ? st : run_rows(api, ctx, label, job, per_row);
}

static OrtStatus *ORT_API_CALL lut_compute(void *op_kernel, OrtKernelContext *ctx) {
    LutKernel *k = (LutKernel *)op_kernel;
    const OrtApi *api = k->api;
    int64_t stack[8], *dims = stack;
    size_t rank = 0;
    const OrtValue *x = NULL;
    OrtStatus *st = float_input(api, ctx, k->label, &x, &dims, &rank, stack);
    if (!st && k->conv) st = conv_compute(k, ctx, x, dims, rank);
    if (!st && !k->conv) {
        Job job = {.plan = k->plan, .D = k->D, .M = k->M, .path = k->path};
        st = rows_compute(api, ctx, k->label, x, dims, rank, &job, k->M * k->C + ENCODE_COST * k->C);
    }
    if (dims != stack) free(dims);
    return st;
}

/* ------------------------------------------------------------------------------------ */
/* SpnMatMul                                                                             */

typedef struct SpnKernel {
    const OrtApi *api;
    spn_plan *plan;
    lut_conv *conv; /* SpnConv: the patch geometry, every one of the D columns a "split dim" */
    int conv_requested;
    int path;
    int64_t D, M, R;
    char label[320];
} SpnKernel;

static void ORT_API_CALL spn_kernel_destroy(void *op_kernel) {
    SpnKernel *k = (SpnKernel *)op_kernel;
    if (!k) return;
    spn_plan_destroy(k->plan);
    lut_conv_destroy(k->conv);
    free(k);
}

/* SpnConv's geometry: lut_conv validates it, and with every patch column listed (C = ceil(D / 4)
 * groups of 4, the last padded with column D - 1) its index gives each column's pixel. */
static OrtStatus *build_spn_conv(SpnKernel *k, const OrtKernelInfo *info) {
    if (k->D > ((int64_t)1 << 24)) /* lut_conv's C < 2^24 */
        return make_status(k->api, ORT_INVALID_ARGUMENT, "%s: D = %lld exceeds the 2^24 patch inputs SpnConv takes",
                           k->label, (long long)k->D);
    const int64_t C = (k->D + 3) / 4;
    int64_t *split = (int64_t *)malloc(sizeof(int64_t) * (size_t)(4 * C));
    if (!split) return make_status(k->api, ORT_FAIL, "%s: out of memory", k->label);
    for (int64_t i = 0; i < 4 * C; i++) split[i] = i < k->D ? i : k->D - 1;
    OrtStatus *st = read_conv(k->api, info, k->label, k->D, C, split, 4 * C, &k->conv);
    free(split);
    /* no fused pooling: a max_pool would change the output, so it is refused, not ignored */
    int64_t *pool = NULL;
    size_t n_pool = 0;
    if (!st && (st = read_optional_ints(k->api, info, k->label, "max_pool", &pool, &n_pool)) == NULL && pool)
        st = make_status(k->api, ORT_INVALID_ARGUMENT, "%s: SpnConv takes no 'max_pool' attribute", k->label);
    free(pool);
    return st;
}

static OrtStatus *build_spn(SpnKernel *k, const OrtKernelInfo *info) {
    const OrtApi *api = k->api;
    const char *label = k->label;
    int64_t relu = 0, activations = 0;
    float *a = NULL, *bias = NULL;
    size_t n_a = 0, n_bias = 0;
    OrtValue *wb = NULL, *wc = NULL;
    const void *wb_data = NULL, *wc_data = NULL;
    OrtStatus *st = NULL;
    if ((st = read_int(api, info, label, "D", &k->D)) || (st = read_int(api, info, label, "M", &k->M)) ||
        (st = read_int(api, info, label, "R", &k->R)) || (st = read_int(api, info, label, "relu", &relu)) ||
        (st = read_optional_int(api, info, label, "activations", 0, &activations)))
        return st;
    if (k->D < 1 || k->M < 1 || k->R < 1 || k->D > INT32_MAX || k->M > INT32_MAX || k->R > INT32_MAX)
        return make_status(api, ORT_INVALID_ARGUMENT, "%s: D, M and R must lie in [1, 2^31 - 1], got %lld, %lld, %lld",
                           label, (long long)k->D, (long long)k->M, (long long)k->R);
    const int64_t want_b[2] = {k->R, (k->D + 3) / 4}, want_c[2] = {k->M, (k->R + 3) / 4};
    char err[512];
    if (!(st = read_floats(api, info, label, "a", &a, &n_a)) && !(st = read_floats(api, info, label, "bias", &bias, &n_bias)) &&
        !(st = read_u8_tensor(api, info, label, "wb", "[R, ceil(D / 4)]", want_b, 2, &wb, &wb_data)) &&
        !(st = read_u8_tensor(api, info, label, "wc", "[M, ceil(R / 4)]", want_c, 2, &wc, &wc_data))) {
        const int rc = spn_plan_create(&k->plan, k->D, k->M, k->R, (const uint8_t *)wb_data, want_b[0] * want_b[1], a,
                                       (int64_t)n_a, (const uint8_t *)wc_data, want_c[0] * want_c[1], bias,
                                       (int64_t)n_bias, relu, activations, err, sizeof err);
        if (rc != LUT_OK)
            st = make_status(api, rc == LUT_ENOMEM ? ORT_FAIL : ORT_INVALID_ARGUMENT, "%s: %s", label, err);
    }
    if (wb) api->ReleaseValue(wb); /* [96] */
    if (wc) api->ReleaseValue(wc);
    free(a);
    free(bias);
    if (!st && k->conv_requested) st = build_spn_conv(k, info);
    return st;
}

static OrtStatus *build_spn_kernel(void *k, const OrtKernelInfo *info) { return build_spn((SpnKernel *)k, info); }

static OrtStatus *ORT_API_CALL spn_create_kernel(const OrtCustomOp *op, const OrtApi *api,
                                                 const OrtKernelInfo *info, void **kernel) {
    *kernel = NULL;
    SpnKernel *k = (SpnKernel *)calloc(1, sizeof *k);
    if (!k) return api->CreateStatus(ORT_FAIL, "SpnMatMul: out of memory creating the kernel");
    k->api = api;
    k->conv_requested = op == &g_spnconv.op;
    return finish_kernel(op, api, info, k, k->label, sizeof k->label, &k->path, build_spn_kernel, spn_kernel_destroy,
                         kernel);
}

/* SpnConv: work items (image, tile of up to SPN_TILE output positions, fewer for wide patches
 * so that a tile's P stays within SPN_TILE_FLOATS); each gathers its patches row-major,
 * P[r][d] (0 in the padding), runs spn_apply over them and writes the outputs into NCHW.
 * Positions are independent, so the split changes no bit. */
#define SPN_TILE 256
#define SPN_TILE_FLOATS ((int64_t)1 << 22)

typedef struct SpnConvJob {
    const SpnKernel *k;
    const float *X;
    float *Y;
    const int32_t *index; /* lut_conv_index_for: index[d * positions + pos] */
    int64_t in_image, positions, tile, tiles;
    int failed;
    char err[256];
} SpnConvJob;

static void run_spn_conv_task(void *arg, size_t item) {
    SpnConvJob *job = (SpnConvJob *)arg;
    const SpnKernel *k = job->k;
    const int64_t n = (int64_t)item / job->tiles, first = ((int64_t)item % job->tiles) * job->tile;
    const int64_t rows = job->positions - first < job->tile ? job->positions - first : job->tile;
    float *P = (float *)malloc(sizeof(float) * (size_t)(rows * (k->D + k->M)));
    char err[256];
    int rc = LUT_ENOMEM;
    if (P) {
        float *Yr = P + rows * k->D;
        const float *x = job->X + n * job->in_image;
        for (int64_t r = 0; r < rows; r++)
            for (int64_t d = 0; d < k->D; d++) {
                const int32_t at = job->index[d * job->positions + first + r];
                P[r * k->D + d] = at < 0 ? 0.0f : x[at];
            }
        rc = spn_apply(k->plan, P, rows, Yr, k->path, err, sizeof err);
        float *y = job->Y + n * k->M * job->positions + first;
        if (rc == LUT_OK)
            for (int64_t m = 0; m < k->M; m++)
                for (int64_t r = 0; r < rows; r++) y[m * job->positions + r] = Yr[r * k->M + m];
    } else {
        snprintf(err, sizeof err, "out of memory for %lld patches", (long long)rows);
    }
    free(P);
    if (rc != LUT_OK && __atomic_exchange_n(&job->failed, 1, __ATOMIC_ACQ_REL) == 0)
        memcpy(job->err, err, sizeof err);
}

static OrtStatus *spn_conv_compute(SpnKernel *k, OrtKernelContext *ctx, const OrtValue *x, const int64_t *dims,
                                   size_t rank) {
    const OrtApi *api = k->api;
    int64_t OH = 0, OW = 0;
    OrtStatus *st = conv_output_size(api, k->conv, k->label, k->M, dims, rank, &OH, &OW);
    if (st) return st;
    const int64_t out_dims[4] = {dims[0], k->M, OH, OW};
    SpnConvJob job;
    memset(&job, 0, sizeof job);
    if ((st = nchw_output(api, ctx, x, out_dims, &job.X, &job.Y)) || dims[0] == 0) return st;
    job.k = k;
    job.in_image = dims[1] * dims[2] * dims[3];
    job.positions = OH * OW;
    job.tile = SPN_TILE_FLOATS / (k->D + k->M);
    job.tile = job.tile < 1 ? 1 : job.tile > SPN_TILE ? SPN_TILE : job.tile;
    job.tiles = (job.positions + job.tile - 1) / job.tile;
    int32_t *owned = NULL;
    if ((st = patch_index(api, k->conv, k->label, dims, job.positions, &job.index, &owned))) return st;
    st = run_items(api, ctx, k->label, run_spn_conv_task, &job, dims[0] * job.tiles, &job.failed, job.err);
    free(owned);
    return st;
}

static OrtStatus *ORT_API_CALL spn_compute(void *op_kernel, OrtKernelContext *ctx) {
    SpnKernel *k = (SpnKernel *)op_kernel;
    const OrtApi *api = k->api;
    int64_t stack[8], *dims = stack;
    size_t rank = 0;
    const OrtValue *x = NULL;
    OrtStatus *st = float_input(api, ctx, k->label, &x, &dims, &rank, stack);
    if (!st && k->conv) {
        st = spn_conv_compute(k, ctx, x, dims, rank);
    } else if (!st) { /* per row: an add per nonzero weight, about half of them */
        Job job = {.spn = k->plan, .D = k->D, .M = k->M, .path = k->path};
        st = rows_compute(api, ctx, k->label, x, dims, rank, &job, (k->D + k->M) * k->R / 2);
    }
    if (dims != stack) free(dims);
    return st;
}

/* ------------------------------------------------------------------------------------ */
/* schema callbacks                                                                      */

static const char *ORT_API_CALL op_get_name(const OrtCustomOp *op) {
    return op == &g_lutconv.op ? LUT_CONV_OP_NAME : op == &g_spnmatmul.op ? SPN_OP_NAME
         : op == &g_spnconv.op ? SPN_CONV_OP_NAME : LUT_OP_NAME;
}
static const char *ORT_API_CALL op_get_ep(const OrtCustomOp *op) {
    (void)op;
    return NULL; /* CPU execution provider */
}
static ONNXTensorElementDataType ORT_API_CALL op_get_type(const OrtCustomOp *op, size_t index) {
    (void)op;
    (void)index;
    return ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT;
}
static size_t ORT_API_CALL op_get_count(const OrtCustomOp *op) {
    (void)op;
    return 1;
}
static OrtCustomOpInputOutputCharacteristic ORT_API_CALL op_get_characteristic(const OrtCustomOp *op,
                                                                              size_t index) {
    (void)op;
    (void)index;
    return INPUT_OUTPUT_REQUIRED;
}
static OrtMemType ORT_API_CALL op_get_mem_type(const OrtCustomOp *op, size_t index) {
    (void)op;
    (void)index;
    return OrtMemTypeDefault;
}
static int ORT_API_CALL op_variadic_min_arity(const OrtCustomOp *op) {
    (void)op;
    return 1;
}
static int ORT_API_CALL op_variadic_homogeneity(const OrtCustomOp *op) {
    (void)op;
    return 1;
}
static int ORT_API_CALL op_start_version(const OrtCustomOp *op) {
    (void)op;
    return 1;
}
static int ORT_API_CALL op_end_version(const OrtCustomOp *op) {
    (void)op;
    return INT_MAX;
}

/* The ops share every schema callback; LutMatMul and LutConv share create and compute too,
 * which tell them apart by the op pointer and by whether the kernel holds a patch encoder. */
#define OP_DEFINITION(destroy, create, compute)                                    \
    {                                                                              \
        .op = {                                                                    \
            .version = ORT_API_VERSION,                                            \
            .CreateKernel = NULL, /* CreateKernelV2 is used (version >= 16) */     \
            .GetName = op_get_name,                                                \
            .GetExecutionProviderType = op_get_ep,                                 \
            .GetInputType = op_get_type,                                           \
            .GetInputTypeCount = op_get_count,                                     \
            .GetOutputType = op_get_type,                                          \
            .GetOutputTypeCount = op_get_count,                                    \
            .KernelCompute = NULL, /* KernelComputeV2 is used */                   \
            .KernelDestroy = destroy,                                              \
            .GetInputCharacteristic = op_get_characteristic,                       \
            .GetOutputCharacteristic = op_get_characteristic,                      \
            .GetInputMemoryType = op_get_mem_type,                                 \
            .GetVariadicInputMinArity = op_variadic_min_arity,                     \
            .GetVariadicInputHomogeneity = op_variadic_homogeneity,                \
            .GetVariadicOutputMinArity = op_variadic_min_arity,                    \
            .GetVariadicOutputHomogeneity = op_variadic_homogeneity,               \
            .CreateKernelV2 = create,                                              \
            .KernelComputeV2 = compute,                                            \
            .InferOutputShapeFn = NULL,                                            \
            .GetStartVersion = op_start_version,                                   \
            .GetEndVersion = op_end_version,                                       \
        },                                                                         \
        .reserved = {0},                                                           \
    }

static const OpDefinition g_lutmatmul = OP_DEFINITION(lut_kernel_destroy, lut_create_kernel, lut_compute);
static const OpDefinition g_lutconv = OP_DEFINITION(lut_kernel_destroy, lut_create_kernel, lut_compute);
static const OpDefinition g_spnmatmul = OP_DEFINITION(spn_kernel_destroy, spn_create_kernel, spn_compute);
static const OpDefinition g_spnconv = OP_DEFINITION(spn_kernel_destroy, spn_create_kernel, spn_compute);

/* ------------------------------------------------------------------------------------ */
/* registration                                                                          */

/* Domains must outlive the sessions using them; release them when the library unloads. */
typedef struct DomainNode {
    OrtCustomOpDomain *domain;
    const OrtApi *api;
    struct DomainNode *next;
} DomainNode;

static DomainNode *g_domains = NULL;

__attribute__((destructor)) static void release_domains(void) {
    DomainNode *n = __atomic_exchange_n(&g_domains, NULL, __ATOMIC_ACQ_REL);
    while (n) {
        DomainNode *next = n->next;
        n->api->ReleaseCustomOpDomain(n->domain); /* [101] */
        free(n);
        n = next;
    }
}

/* The error RegisterCustomOps returns when the runtime's API is not the one ort_abi.h
 * declares.  It cannot come from the version-ORT_API_VERSION table (missing, or failing the
 * probe), so it is made with version 1's CreateStatus: slot 0 of every OrtApi version, and
 * every onnxruntime serves version 1.  Only if even that is missing is the message printed
 * to stderr instead (there is no other way to tell this runtime), and NULL returned. */
static OrtStatus *abi_error(const OrtApiBase *base, const char *fmt, ...) __attribute__((format(printf, 2, 3)));

static OrtStatus *abi_error(const OrtApiBase *base, const char *fmt, ...) {
    char msg[512];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(msg, sizeof msg, fmt, ap);
    va_end(ap);
    const OrtApi *v1 = base->GetApi ? base->GetApi(1) : NULL;
    if (v1 && v1->CreateStatus) return v1->CreateStatus(ORT_FAIL, msg); /* [0] */
    fprintf(stderr, "%s\n", msg);
    return NULL;
}

LUT_EXPORT OrtStatus *ORT_API_CALL RegisterCustomOps(OrtSessionOptions *options,
                                                     const OrtApiBase *api_base) {
    if (!api_base) return NULL; /* nothing to report an error through */
    const char *version = api_base->GetVersionString ? api_base->GetVersionString() : NULL;
    if (!version) version = "(no version string)";
    const OrtApi *api = api_base->GetApi ? api_base->GetApi(ORT_API_VERSION) : NULL;
    if (!api)
        return abi_error(api_base,
                         "lutcompile: onnxruntime %s does not provide C API version %d, which the "
                         "LutMatMul and LutConv ops need (onnxruntime 1.17 or newer); they are "
                         "not registered", version, ORT_API_VERSION);
    /* cheap check that the first slots of the table are where ort_abi.h says */
    static const char probe_text[] = "lutcompile-abi-probe";
    OrtStatus *probe = api->CreateStatus ? api->CreateStatus(ORT_INVALID_GRAPH, probe_text) : NULL; /* [0] */
    const char *said = probe && api->GetErrorMessage ? api->GetErrorMessage(probe) : NULL;          /* [2] */
    if (!said || strcmp(said, probe_text) != 0 || !api->GetErrorCode ||
        api->GetErrorCode(probe) != ORT_INVALID_GRAPH) /* [1] */
        /* the probe status is left unreleased: with slots out of place, this table's
         * ReleaseStatus cannot be trusted either */
        return abi_error(api_base,
                         "lutcompile: the C API version %d table of onnxruntime %s does not match "
                         "lutcompile's declarations (ort_abi.h: CreateStatus, GetErrorCode and "
                         "GetErrorMessage at slots 0-2); the LutMatMul and LutConv ops are not "
                         "registered", ORT_API_VERSION, version);
    api->ReleaseStatus(probe); /* [93] */

    OrtCustomOpDomain *domain = NULL;
    OrtStatus *st = api->CreateCustomOpDomain(LUT_DOMAIN, &domain); /* [26] */
    if (st) return st;
    if ((st = api->CustomOpDomain_Add(domain, &g_lutmatmul.op)) || /* [27] */
        (st = api->CustomOpDomain_Add(domain, &g_lutconv.op)) ||
        (st = api->CustomOpDomain_Add(domain, &g_spnmatmul.op)) ||
        (st = api->CustomOpDomain_Add(domain, &g_spnconv.op)) ||
        (st = api->AddCustomOpDomain(options, domain))) {          /* [28] */
        api->ReleaseCustomOpDomain(domain);
        return st;
    }
    DomainNode *node = (DomainNode *)malloc(sizeof *node);
    if (node) { /* if this fails the domain is simply never released */
        node->domain = domain;
        node->api = api;
        node->next = __atomic_load_n(&g_domains, __ATOMIC_ACQUIRE);
        while (!__atomic_compare_exchange_n(&g_domains, &node->next, node, 0, __ATOMIC_ACQ_REL,
                                            __ATOMIC_ACQUIRE)) {
        }
    }
    return NULL;
}
