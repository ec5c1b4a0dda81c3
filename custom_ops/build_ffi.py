"""Build description of the C kernel, shared by setup.py and cffi.

One set of C sources, two artifacts:

- ``lutcompile._lutkernel``: a cffi (API mode) extension over KERNEL_SOURCES, which
  ``lutcompile.kernel`` calls from Python;
- ``lutcompile._lutops``: a plain shared library over KERNEL_SOURCES + ORT_SOURCES that
  onnxruntime loads (setup.py declares it as a setuptools Extension).

Paths are relative to the repository root (setup.py runs from there).  No -march flag:
the AVX2 / AVX-512 code paths are selected per function with GCC target attributes and
picked at run time.  -ffp-contract=off keeps the float epilogue free of fused
multiply-adds, so every path rounds exactly like the numpy reference.
"""
from cffi import FFI

KERNEL_SOURCES = ["custom_ops/lutkernel.c"]
ORT_SOURCES = ["custom_ops/lutmatmul_op.c", "custom_ops/lutconv.c"]
INCLUDE_DIRS = ["custom_ops"]
COMPILE_ARGS = [
    "-O3",
    "-std=c11",
    "-fvisibility=hidden",
    "-ffp-contract=off",
    "-fno-fast-math",
    "-Wall",
    "-Wextra",
    "-Wno-unused-parameter",
]

CDEF = """
#define LUT_OK 0
#define LUT_EINVAL 1
#define LUT_ENOMEM 2
#define LUT_EPATH 3
#define LUT_PATH_AUTO -1
#define LUT_PATH_SCALAR 0
#define LUT_PATH_AVX2 1
#define LUT_PATH_AVX512 2

typedef struct lut_plan lut_plan;

int lut_paths_available(void);
const char *lut_path_name(int path);
int lut_resolve_path(int requested, char *err, size_t errlen);

int lut_plan_create(lut_plan **out, int64_t D, int64_t M, int64_t C, int64_t K,
                    const int64_t *split_dims, int64_t n_split,
                    const float *thresholds, int64_t n_thresholds,
                    const uint8_t *tables, int64_t n_tables,
                    float scale,
                    const float *offsets, int64_t n_offsets,
                    const float *bias, int64_t n_bias,
                    int64_t relu, char *err, size_t errlen);
int lut_encoder_create(lut_plan **out, int64_t D, int64_t C,
                       const int64_t *split_dims, int64_t n_split,
                       const float *thresholds, int64_t n_thresholds,
                       char *err, size_t errlen);
void lut_plan_destroy(lut_plan *plan);
int64_t lut_plan_D(const lut_plan *plan);
int64_t lut_plan_M(const lut_plan *plan);
int64_t lut_plan_C(const lut_plan *plan);

int lut_encode(const lut_plan *plan, const float *X, int64_t N, uint8_t *codes,
               int path, char *err, size_t errlen);
int lut_scan(const lut_plan *plan, const uint8_t *codes, int64_t N, float *Y,
             int path, char *err, size_t errlen);
int lut_apply(const lut_plan *plan, const float *X, int64_t N, float *Y,
              int path, char *err, size_t errlen);
"""

ffibuilder = FFI()
ffibuilder.cdef(CDEF)
ffibuilder.set_source(
    "lutcompile._lutkernel",
    '#include "lutkernel.h"\n',
    sources=KERNEL_SOURCES,
    include_dirs=INCLUDE_DIRS,
    extra_compile_args=COMPILE_ARGS,
)

if __name__ == "__main__":  # python custom_ops/build_ffi.py (from the repository root)
    ffibuilder.compile(verbose=True)
