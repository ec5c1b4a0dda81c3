"""Builds the C kernel twice from one set of sources in custom_ops/:

- lutcompile._lutkernel: a cffi extension, so Python (tests, the numpy-side reference) calls
  encode and scan directly;
- lutcompile._lutops: a plain shared library with no Python symbols, the file that
  onnxruntime's register_custom_ops_library loads (any host process can load it).
"""
import sys

from setuptools import Extension, setup

sys.path.insert(0, "custom_ops")
from build_ffi import COMPILE_ARGS, KERNEL_SOURCES, LIBRARIES, ORT_SOURCES, INCLUDE_DIRS  # noqa: E402

setup(
    cffi_modules=["custom_ops/build_ffi.py:ffibuilder"],
    ext_modules=[
        Extension(
            "lutcompile._lutops",
            sources=KERNEL_SOURCES + ORT_SOURCES,
            include_dirs=INCLUDE_DIRS,
            extra_compile_args=COMPILE_ARGS,
            libraries=LIBRARIES,
        )
    ],
)
