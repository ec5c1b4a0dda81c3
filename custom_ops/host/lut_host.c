/*
 * lut_host.c: serve a compiled model (fast.onnx) from C, without Python.
 *
 * It dlopens libonnxruntime by path (the Python wheel's onnxruntime/capi/libonnxruntime.so.*
 * will do: it ships no headers, so the ABI comes from ../ort_abi.h, API version 17),
 * registers lutcompile's custom-op library (the file `lutcompile.library_path()` names),
 * runs the model once on the tensors of an input file and writes every output to a file.
 *
 * Build (no Makefile; only libdl):
 *   cc -O2 -std=c11 -I custom_ops custom_ops/host/lut_host.c -ldl -o lut_host
 *
 * Run:
 *   lut_host [-t THREADS] LIBONNXRUNTIME LUTOPS_LIBRARY MODEL INPUT_FILE OUTPUT_FILE
 *   THREADS: onnxruntime's intra-op threads (default 1; 0 lets onnxruntime choose).
 *   Exit status 0 on success; 1 with one line "lut_host: error: ..." on stderr on any failure
 *   (a library that does not load, a malformed input file, an onnxruntime error); 2 on bad usage.
 *
 * Tensor file format (inputs and outputs alike), all integers and floats little-endian:
 *   char     magic[4] = "LUT1"
 *   uint32   count                   number of tensors
 *   count times:
 *     uint32 rank                    0 .. 16
 *     int64  dims[rank]              each >= 0
 *     float  data[dims[0] * ...]     float32, row-major (C order)
 *   and nothing after the last tensor.
 * Tensors are matched to the model's inputs by position (the graph's input order, as
 * onnxruntime.InferenceSession.get_inputs() lists them); the output file holds every graph
 * output in order. Only float32 inputs and outputs are handled. The input file is checked
 * against its header (its size must be exactly what the shapes need) and against the model
 * (count, element type, rank and each fixed dimension) before anything runs.
 */
#define _POSIX_C_SOURCE 200809L

#include <dlfcn.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "ort_abi.h"

#define MAX_RANK 16
#define MAGIC "LUT1"

static const OrtApi *api;

#if defined(__GNUC__)
#define PRINTF_LIKE __attribute__((format(printf, 1, 2)))
#else
#define PRINTF_LIKE
#endif

/* one line on stderr (newlines in onnxruntime's messages folded into spaces), then exit 1 */
static _Noreturn void die(const char *fmt, ...) PRINTF_LIKE;
static _Noreturn void die(const char *fmt, ...) {
    char msg[2048];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(msg, sizeof msg, fmt, ap);
    va_end(ap);
    for (char *c = msg; *c; c++)
        if (*c == '\n' || *c == '\r' || *c == '\t') *c = ' ';
    size_t n = strlen(msg);
    while (n > 0 && msg[n - 1] == ' ') msg[--n] = '\0';
    fprintf(stderr, "lut_host: error: %s\n", msg);
    exit(1);
}

/* every onnxruntime call goes through here: a non-NULL status is a failure */
static void check(OrtStatus *status, const char *what) {
    if (!status) return;
    char msg[1536];
    snprintf(msg, sizeof msg, "%s", api->GetErrorMessage(status));
    api->ReleaseStatus(status);
    die("%s: %s", what, msg);
}

typedef struct {
    size_t rank;
    int64_t dims[MAX_RANK];
    size_t count; /* elements */
    float *data;  /* 64-byte aligned copy (input) or onnxruntime's buffer (output) */
} Tensor;

static void format_dims(char *buf, size_t size, const int64_t *dims, size_t rank) {
    size_t used = (size_t)snprintf(buf, size, "[");
    for (size_t i = 0; i < rank && used < size; i++) {
        if (dims[i] < 0)
            used += (size_t)snprintf(buf + used, size - used, "%s?", i ? ", " : "");
        else
            used += (size_t)snprintf(buf + used, size - used, "%s%lld", i ? ", " : "",
                                     (long long)dims[i]);
    }
    if (used < size) snprintf(buf + used, size - used, "]");
}

/* ---- the tensor file ---- */

typedef struct {
    const unsigned char *p;
    size_t left;
} Cursor;

static int take(Cursor *c, void *dst, size_t n) {
    if (c->left < n) return 0;
    memcpy(dst, c->p, n);
    c->p += n;
    c->left -= n;
    return 1;
}

static unsigned char *slurp(const char *path, size_t *size) {
    FILE *f = fopen(path, "rb");
    if (!f) die("cannot open input file '%s'", path);
    if (fseek(f, 0, SEEK_END) != 0) die("cannot seek in input file '%s'", path);
    long end = ftell(f);
    if (end < 0 || fseek(f, 0, SEEK_SET) != 0) die("cannot size input file '%s'", path);
    *size = (size_t)end;
    unsigned char *buf = malloc(*size ? *size : 1);
    if (!buf) die("out of memory reading '%s' (%zu bytes)", path, *size);
    if (fread(buf, 1, *size, f) != *size) die("cannot read input file '%s'", path);
    fclose(f);
    return buf;
}

/* parse and validate the whole file; returns the tensors (data copied out, aligned) */
static Tensor *read_tensors(const char *path, uint32_t *count_out) {
    size_t size = 0;
    unsigned char *buf = slurp(path, &size);
    Cursor c = {buf, size};
    char magic[4];
    uint32_t count;
    if (!take(&c, magic, 4) || memcmp(magic, MAGIC, 4) != 0)
        die("%s: not a tensor file (it must start with \"" MAGIC "\")", path);
    if (!take(&c, &count, 4)) die("%s: file is %zu bytes, too short for its header", path, size);
    if (count > 4096) die("%s: header claims %u tensors", path, count);
    Tensor *ts = calloc(count ? count : 1, sizeof *ts);
    if (!ts) die("out of memory");
    size_t needed = 8; /* bytes the header's shapes call for, so far */
    for (uint32_t i = 0; i < count; i++) {
        Tensor *t = &ts[i];
        uint32_t rank;
        if (!take(&c, &rank, 4))
            die("%s: file is %zu bytes, but its header's shapes need more (tensor %u is cut off)",
                path, size, i);
        if (rank > MAX_RANK) die("%s: tensor %u has rank %u (at most %d)", path, i, rank, MAX_RANK);
        t->rank = rank;
        if (!take(&c, t->dims, 8 * (size_t)rank))
            die("%s: file is %zu bytes, but its header's shapes need more (tensor %u is cut off)",
                path, size, i);
        size_t count_el = 1;
        for (size_t d = 0; d < t->rank; d++) {
            if (t->dims[d] < 0) die("%s: tensor %u has a negative dimension", path, i);
            if (t->dims[d] && count_el > SIZE_MAX / 4 / (size_t)t->dims[d])
                die("%s: tensor %u is too large", path, i);
            count_el *= (size_t)t->dims[d];
        }
        t->count = count_el;
        size_t bytes = 4 * count_el;
        needed += 4 + 8 * (size_t)rank + bytes;
        if (c.left < bytes) {
            char shape[256];
            format_dims(shape, sizeof shape, t->dims, t->rank);
            die("%s: file is %zu bytes, but its header's shapes need at least %zu (tensor %u of "
                "shape %s is cut short)", path, size, needed, i, shape);
        }
        t->data = aligned_alloc(64, (bytes + 63) / 64 * 64 + 64);
        if (!t->data) die("out of memory");
        take(&c, t->data, bytes);
    }
    if (c.left)
        die("%s: file is %zu bytes, but its header's shapes need exactly %zu (%zu bytes too many)",
            path, size, needed, c.left);
    free(buf);
    *count_out = count;
    return ts;
}

static void put(FILE *f, const void *src, size_t n, const char *path) {
    if (fwrite(src, 1, n, f) != n) die("cannot write output file '%s'", path);
}

static void write_tensors(const char *path, const Tensor *ts, uint32_t count) {
    FILE *f = fopen(path, "wb");
    if (!f) die("cannot create output file '%s'", path);
    put(f, MAGIC, 4, path);
    put(f, &count, 4, path);
    for (uint32_t i = 0; i < count; i++) {
        uint32_t rank = (uint32_t)ts[i].rank;
        put(f, &rank, 4, path);
        put(f, ts[i].dims, 8 * (size_t)rank, path);
        put(f, ts[i].data, 4 * ts[i].count, path);
    }
    if (fclose(f) != 0) die("cannot write output file '%s'", path);
}

/* ---- the model's inputs against the file's tensors ---- */

static void check_input(const OrtSession *session, size_t index, const char *name,
                        const Tensor *t) {
    OrtTypeInfo *type = NULL;
    check(api->SessionGetInputTypeInfo(session, index, &type), "SessionGetInputTypeInfo");
    const OrtTensorTypeAndShapeInfo *info = NULL;
    check(api->CastTypeInfoToTensorInfo(type, &info), "CastTypeInfoToTensorInfo");
    if (!info) die("model input '%s' is not a tensor", name);
    ONNXTensorElementDataType elem;
    check(api->GetTensorElementType(info, &elem), "GetTensorElementType");
    if (elem != ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT)
        die("model input '%s' has element type %d; only float32 (1) is handled", name, (int)elem);
    size_t rank = 0;
    check(api->GetDimensionsCount(info, &rank), "GetDimensionsCount");
    int64_t want[MAX_RANK];
    if (rank > MAX_RANK) die("model input '%s' has rank %zu (at most %d)", name, rank, MAX_RANK);
    check(api->GetDimensions(info, want, rank), "GetDimensions");
    int ok = rank == t->rank;
    for (size_t d = 0; ok && d < rank; d++)
        if (want[d] >= 0 && want[d] != t->dims[d]) ok = 0;
    if (!ok) {
        char got_s[256], want_s[256];
        format_dims(got_s, sizeof got_s, t->dims, t->rank);
        format_dims(want_s, sizeof want_s, want, rank);
        die("input %zu ('%s'): the file gives shape %s, the model takes %s", index, name, got_s,
            want_s);
    }
    api->ReleaseTypeInfo(type);
}

static _Noreturn void usage(void) {
    fprintf(stderr, "usage: lut_host [-t THREADS] LIBONNXRUNTIME LUTOPS_LIBRARY MODEL "
                    "INPUT_FILE OUTPUT_FILE\n");
    exit(2);
}

int main(int argc, char **argv) {
    int threads = 1;
    int a = 1;
    if (a < argc && strcmp(argv[a], "-t") == 0) {
        char *end = NULL;
        if (a + 1 >= argc) usage();
        long v = strtol(argv[a + 1], &end, 10);
        if (!*argv[a + 1] || *end || v < 0 || v > 4096) usage();
        threads = (int)v;
        a += 2;
    }
    if (argc - a != 5) usage();
    const char *ort_path = argv[a], *lutops_path = argv[a + 1], *model_path = argv[a + 2];
    const char *in_path = argv[a + 3], *out_path = argv[a + 4];

    const uint16_t one = 1;
    if (*(const unsigned char *)&one != 1) die("the tensor file format is little-endian only");

    /* the input file first: a bad one fails before any library loads */
    uint32_t n_in_file = 0;
    Tensor *inputs = read_tensors(in_path, &n_in_file);

    void *lib = dlopen(ort_path, RTLD_NOW | RTLD_LOCAL);
    if (!lib) die("cannot load onnxruntime '%s': %s", ort_path, dlerror());
    OrtGetApiBaseFn get_base = NULL;
    void *sym = dlsym(lib, "OrtGetApiBase");
    if (!sym) die("'%s' has no OrtGetApiBase: is it libonnxruntime?", ort_path);
    memcpy(&get_base, &sym, sizeof get_base); /* object pointer to function pointer */
    const OrtApiBase *base = get_base();
    api = base ? base->GetApi(ORT_API_VERSION) : NULL;
    if (!api)
        die("onnxruntime %s does not serve C API version %d",
            base ? base->GetVersionString() : "?", ORT_API_VERSION);

    OrtEnv *env = NULL;
    check(api->CreateEnv(ORT_LOGGING_LEVEL_FATAL, "lut_host", &env), "CreateEnv");
    OrtSessionOptions *options = NULL;
    check(api->CreateSessionOptions(&options), "CreateSessionOptions");
    check(api->SetIntraOpNumThreads(options, threads), "SetIntraOpNumThreads");
    check(api->RegisterCustomOpsLibrary_V2(options, lutops_path), "RegisterCustomOpsLibrary_V2");
    OrtSession *session = NULL;
    check(api->CreateSession(env, model_path, options, &session), "CreateSession");

    OrtAllocator *alloc = NULL;
    check(api->GetAllocatorWithDefaultOptions(&alloc), "GetAllocatorWithDefaultOptions");
    size_t n_in = 0, n_out = 0;
    check(api->SessionGetInputCount(session, &n_in), "SessionGetInputCount");
    check(api->SessionGetOutputCount(session, &n_out), "SessionGetOutputCount");
    if (n_in != n_in_file)
        die("%s holds %u tensor(s) but the model has %zu input(s)", in_path, n_in_file, n_in);
    char **in_names = calloc(n_in + 1, sizeof *in_names);
    char **out_names = calloc(n_out + 1, sizeof *out_names);
    OrtValue **in_values = calloc(n_in + 1, sizeof *in_values);
    OrtValue **out_values = calloc(n_out + 1, sizeof *out_values);
    Tensor *outputs = calloc(n_out + 1, sizeof *outputs);
    if (!in_names || !out_names || !in_values || !out_values || !outputs) die("out of memory");

    OrtMemoryInfo *cpu = NULL;
    check(api->CreateCpuMemoryInfo(OrtArenaAllocator, OrtMemTypeDefault, &cpu),
          "CreateCpuMemoryInfo");
    for (size_t i = 0; i < n_in; i++) {
        check(api->SessionGetInputName(session, i, alloc, &in_names[i]), "SessionGetInputName");
        check_input(session, i, in_names[i], &inputs[i]);
        check(api->CreateTensorWithDataAsOrtValue(cpu, inputs[i].data, 4 * inputs[i].count,
                                                  inputs[i].dims, inputs[i].rank,
                                                  ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT,
                                                  &in_values[i]),
              "CreateTensorWithDataAsOrtValue");
    }
    for (size_t i = 0; i < n_out; i++)
        check(api->SessionGetOutputName(session, i, alloc, &out_names[i]), "SessionGetOutputName");

    check(api->Run(session, NULL, (const char *const *)in_names, (const OrtValue *const *)in_values,
                   n_in, (const char *const *)out_names, n_out, out_values),
          "Run");

    for (size_t i = 0; i < n_out; i++) {
        OrtTensorTypeAndShapeInfo *info = NULL;
        check(api->GetTensorTypeAndShape(out_values[i], &info), "GetTensorTypeAndShape");
        ONNXTensorElementDataType elem;
        check(api->GetTensorElementType(info, &elem), "GetTensorElementType");
        if (elem != ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT)
            die("model output '%s' has element type %d; only float32 (1) is handled",
                out_names[i], (int)elem);
        check(api->GetDimensionsCount(info, &outputs[i].rank), "GetDimensionsCount");
        if (outputs[i].rank > MAX_RANK)
            die("model output '%s' has rank %zu (at most %d)", out_names[i], outputs[i].rank,
                MAX_RANK);
        check(api->GetDimensions(info, outputs[i].dims, outputs[i].rank), "GetDimensions");
        check(api->GetTensorShapeElementCount(info, &outputs[i].count),
              "GetTensorShapeElementCount");
        api->ReleaseTensorTypeAndShapeInfo(info);
        void *data = NULL;
        check(api->GetTensorMutableData(out_values[i], &data), "GetTensorMutableData");
        outputs[i].data = data;
    }
    write_tensors(out_path, outputs, (uint32_t)n_out);

    for (size_t i = 0; i < n_out; i++) {
        api->ReleaseValue(out_values[i]);
        check(api->AllocatorFree(alloc, out_names[i]), "AllocatorFree");
    }
    for (size_t i = 0; i < n_in; i++) {
        api->ReleaseValue(in_values[i]);
        check(api->AllocatorFree(alloc, in_names[i]), "AllocatorFree");
        free(inputs[i].data);
    }
    api->ReleaseMemoryInfo(cpu);
    api->ReleaseSession(session);
    api->ReleaseSessionOptions(options);
    api->ReleaseEnv(env);
    free(inputs);
    free(outputs);
    free(in_names);
    free(out_names);
    free(in_values);
    free(out_values);
    printf("lut_host: %zu input(s) -> %zu output(s) written to %s\n", n_in, n_out, out_path);
    return 0;
}
