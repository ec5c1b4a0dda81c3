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
import re
from pathlib import Path

from cffi import FFI

KERNEL_SOURCES = ["custom_ops/lutkernel.c"]
ORT_SOURCES = ["custom_ops/lutmatmul_op.c", "custom_ops/lutconv.c", "custom_ops/spnkernel.c"]
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
# the sum-product kernel rounds with nearbyintf: a host that is not Python (custom_ops/host)
# loads the op library without libm, so the library names it itself
LIBRARIES = ["m"]

HEADER = "custom_ops/lutkernel.h"


def header_cdef(path: str = HEADER) -> str:
    """cffi's declarations, read from the C header itself so that the two cannot drift: comments,
    include guards and extern "C" dropped, each valued #define turned into `#define NAME ...`
    (cffi's API mode then takes the value from the compiler)."""
    text = re.sub(r"/\*.*?\*/", "", Path(path).read_text(), flags=re.S)
    lines = []
    for line in text.splitlines():
        stripped = line.strip()
        if stripped.startswith("#"):
            define = re.match(r"#define\s+(\w+)\s+\S", stripped)
            if define:
                lines.append(f"#define {define.group(1)} ...")
        elif stripped not in ('extern "C" {', "}"):
            lines.append(line)
    return "\n".join(lines)


ffibuilder = FFI()
ffibuilder.cdef(header_cdef())
ffibuilder.set_source(
    "lutcompile._lutkernel",
    '#include "lutkernel.h"\n',
    sources=KERNEL_SOURCES,
    include_dirs=INCLUDE_DIRS,
    extra_compile_args=COMPILE_ARGS,
)

if __name__ == "__main__":  # python custom_ops/build_ffi.py (from the repository root)
    ffibuilder.compile(verbose=True)
