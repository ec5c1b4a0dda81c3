"""Python access to the native LutMatMul kernel (custom_ops/lutkernel.c).

Two artifacts are built from the same C sources (see custom_ops/build_ffi.py):

- ``lutcompile._lutkernel`` (cffi), used here by `encode`, `scan`, `apply` and `Plan`;
- ``lutcompile._lutops``, the shared library onnxruntime loads; `library_path` finds it.

Every function takes ``path``: None picks the kernel path automatically (the environment
variable ``LUTCOMPILE_KERNEL_PATH=scalar|avx2|avx512`` overrides the choice), or one of
`available_paths()` forces that path.  "avx512" needs AVX-512 F, BW, VL, VBMI and VNNI (Ice
Lake, Zen 4 and later); CPUs with AVX2 but not all of those get "avx2".  All paths give identical codes and bit-identical
outputs, equal to `lutcompile.lut.encode_reference` / `scan_reference`.
"""
from __future__ import annotations

import importlib.machinery
from pathlib import Path

import numpy as np

from .spec import DEPTH, K, NODES, LutParams

PATHS = ("scalar", "avx2", "avx512")  # index = the C path id

_BUILD_HINT = ("build it from the repository root with `pip install -e . --no-build-isolation` "
               "or `python setup.py build_ext --inplace`")
_ERRLEN = 512
_LIB = None


class KernelPathError(RuntimeError):
    """The requested kernel path is unknown or not supported by this CPU."""


def _native():
    global _LIB
    if _LIB is None:
        try:
            from .. import _lutkernel  # type: ignore[attr-defined]
        except ImportError as exc:  # pragma: no cover - depends on the build
            raise ImportError(f"lutcompile._lutkernel is not built; {_BUILD_HINT}") from exc
        _LIB = (_lutkernel.ffi, _lutkernel.lib)
    return _LIB


def library_path() -> str:
    """Absolute path of the onnxruntime custom-op library (lutcompile/_lutops*.so)."""
    here = Path(__file__).resolve().parent.parent  # the extensions sit at the package root
    for suffix in importlib.machinery.EXTENSION_SUFFIXES:
        candidate = here / f"_lutops{suffix}"
        if candidate.is_file():
            return str(candidate)
    found = sorted(here.glob("_lutops*.so"))
    if found:
        return str(found[0])
    raise FileNotFoundError(f"the LutMatMul onnxruntime library (_lutops*.so) is not in {here}; "
                            f"{_BUILD_HINT}")


def available_paths() -> list[str]:
    """Kernel paths this CPU supports, e.g. ["scalar", "avx2", "avx512"]."""
    _, lib = _native()
    mask = lib.lut_paths_available()
    return [name for i, name in enumerate(PATHS) if mask & (1 << i)]


def resolve_path(path: str | None = None) -> str:
    """The path a call with `path` would use (None: automatic / LUTCOMPILE_KERNEL_PATH)."""
    ffi, lib = _native()
    err = ffi.new("char[]", _ERRLEN)
    got = lib.lut_resolve_path(_path_id(path), err, _ERRLEN)
    if got < 0:
        raise KernelPathError(ffi.string(err).decode())
    return PATHS[got]


def _path_id(path: str | None) -> int:
    if path is None:
        return -1
    if isinstance(path, str) and path.lower() in PATHS:
        return PATHS.index(path.lower())
    if isinstance(path, str) and path.lower() == "auto":
        return -1
    raise ValueError(f"unknown kernel path {path!r}; expected None, 'auto' or one of {PATHS}")


def _check(rc: int, err, what: str) -> None:
    if rc == 0:
        return
    ffi, lib = _native()
    msg = f"{what}: {ffi.string(err).decode()}"
    if rc == lib.LUT_EPATH:
        raise KernelPathError(msg)
    if rc == lib.LUT_ENOMEM:
        raise MemoryError(msg)
    raise ValueError(msg)


def _float32_rows(X, what: str, width: int | None = None) -> np.ndarray:
    X = np.asarray(X)
    if X.dtype != np.float32:
        raise ValueError(f"{what} must be float32, got dtype {X.dtype}")
    if X.ndim != 2:
        raise ValueError(f"{what} must be 2-D [N, D], got shape {X.shape}")
    if width is not None and X.shape[1] != width:
        raise ValueError(f"{what} has {X.shape[1]} columns, expected D={width}")
    return np.ascontiguousarray(X)


def _tree_arrays(split_dims, thresholds) -> tuple[np.ndarray, np.ndarray]:
    split = np.asarray(split_dims)
    thr = np.asarray(thresholds)
    if split.ndim != 2 or split.shape[1] != DEPTH or split.shape[0] < 1:
        raise ValueError(f"split_dims must have shape [C, {DEPTH}] with C >= 1, got {split.shape}")
    if not np.issubdtype(split.dtype, np.integer):
        raise ValueError(f"split_dims must be integers, got dtype {split.dtype}")
    if thr.shape != (split.shape[0], NODES):
        raise ValueError(f"thresholds must have shape [C, {NODES}] = [{split.shape[0]}, {NODES}], "
                         f"got {thr.shape}")
    if not np.issubdtype(thr.dtype, np.floating):
        raise ValueError(f"thresholds must be floating point, got dtype {thr.dtype}")
    return (np.ascontiguousarray(split, dtype=np.int64).reshape(-1),
            np.ascontiguousarray(thr, dtype=np.float32).reshape(-1))


class Plan:
    """A validated parameter set with its tables repacked once; reuse it across calls.

    ``Plan(params)`` takes a `LutParams`; ``Plan.encoder(D, split_dims, thresholds)`` makes
    an encode-only plan.
    """

    def __init__(self, params: LutParams):
        if not isinstance(params, LutParams):
            raise TypeError(f"Plan expects a LutParams, got {type(params).__name__}")
        ffi, lib = _native()
        split, thr = _tree_arrays(params.split_dims, params.thresholds)
        tables = np.ascontiguousarray(params.tables, dtype=np.uint8)
        offsets = np.ascontiguousarray(params.offsets, dtype=np.float32).reshape(-1)
        bias = np.ascontiguousarray(params.bias, dtype=np.float32).reshape(-1)
        out = ffi.new("lut_plan **")
        err = ffi.new("char[]", _ERRLEN)
        M = int(tables.shape[0]) if tables.ndim == 3 else int(params.M)
        rc = lib.lut_plan_create(
            out, int(params.D), M, params.C, K,
            ffi.from_buffer("int64_t[]", split), split.size,
            ffi.from_buffer("float[]", thr), thr.size,
            ffi.from_buffer("uint8_t[]", tables), tables.size,
            float(np.float32(params.scale)),
            ffi.from_buffer("float[]", offsets), offsets.size,
            ffi.from_buffer("float[]", bias), bias.size,
            int(bool(params.relu)), err, _ERRLEN)
        _check(rc, err, "LutParams")
        self._plan = ffi.gc(out[0], lib.lut_plan_destroy)
        self.D, self.M, self.C = int(params.D), M, params.C

    @classmethod
    def encoder(cls, D: int, split_dims, thresholds) -> "Plan":
        ffi, lib = _native()
        split, thr = _tree_arrays(split_dims, thresholds)
        out = ffi.new("lut_plan **")
        err = ffi.new("char[]", _ERRLEN)
        rc = lib.lut_encoder_create(out, int(D), split.size // DEPTH,
                                    ffi.from_buffer("int64_t[]", split), split.size,
                                    ffi.from_buffer("float[]", thr), thr.size, err, _ERRLEN)
        _check(rc, err, "encoder")
        self = cls.__new__(cls)
        self._plan = ffi.gc(out[0], lib.lut_plan_destroy)
        self.D, self.M, self.C = int(D), 0, split.size // DEPTH
        return self

    def encode(self, X, path: str | None = None) -> np.ndarray:
        """uint8 codes [N, C] of float32 X [N, D]."""
        ffi, lib = _native()
        X = _float32_rows(X, "X", self.D)
        codes = np.empty((X.shape[0], self.C), dtype=np.uint8)
        err = ffi.new("char[]", _ERRLEN)
        rc = lib.lut_encode(self._plan, ffi.from_buffer("float[]", X), X.shape[0],
                            ffi.from_buffer("uint8_t[]", codes, require_writable=True),
                            _path_id(path), err, _ERRLEN)
        _check(rc, err, "encode")
        return codes

    def scan(self, codes, path: str | None = None) -> np.ndarray:
        """float32 Y [N, M] from uint8 codes [N, C] (values 0..15)."""
        ffi, lib = _native()
        if self.M == 0:
            raise ValueError("scan: this plan is encode-only")
        codes = np.asarray(codes)
        if codes.ndim != 2 or codes.shape[1] != self.C:
            raise ValueError(f"codes must have shape [N, C={self.C}], got {codes.shape}")
        if not np.issubdtype(codes.dtype, np.integer):
            raise ValueError(f"codes must be integers, got dtype {codes.dtype}")
        if codes.size and (codes.min() < 0 or codes.max() >= K):
            raise ValueError(f"codes must lie in [0, {K}), got [{codes.min()}, {codes.max()}]")
        codes = np.ascontiguousarray(codes, dtype=np.uint8)
        Y = np.empty((codes.shape[0], self.M), dtype=np.float32)
        err = ffi.new("char[]", _ERRLEN)
        rc = lib.lut_scan(self._plan, ffi.from_buffer("uint8_t[]", codes), codes.shape[0],
                          ffi.from_buffer("float[]", Y, require_writable=True),
                          _path_id(path), err, _ERRLEN)
        _check(rc, err, "scan")
        return Y

    def apply(self, X, path: str | None = None) -> np.ndarray:
        """float32 Y [..., M] = LutMatMul(X [..., D]), encode and scan fused."""
        ffi, lib = _native()
        if self.M == 0:
            raise ValueError("apply: this plan is encode-only")
        X = np.asarray(X)
        if X.dtype != np.float32:
            raise ValueError(f"X must be float32, got dtype {X.dtype}")
        if X.ndim < 1 or X.shape[-1] != self.D:
            raise ValueError(f"X must have shape [..., D={self.D}], got {X.shape}")
        lead = X.shape[:-1]
        flat = np.ascontiguousarray(X.reshape(-1, self.D))
        Y = np.empty((flat.shape[0], self.M), dtype=np.float32)
        err = ffi.new("char[]", _ERRLEN)
        rc = lib.lut_apply(self._plan, ffi.from_buffer("float[]", flat), flat.shape[0],
                           ffi.from_buffer("float[]", Y, require_writable=True),
                           _path_id(path), err, _ERRLEN)
        _check(rc, err, "apply")
        return Y.reshape(*lead, self.M)


def encode(X, split_dims, thresholds, path: str | None = None) -> np.ndarray:
    """uint8 codes [N, C] of float32 X [N, D] through the trees (split_dims [C, 4],
    thresholds [C, 15], compared in float32)."""
    X = _float32_rows(X, "X")
    return Plan.encoder(X.shape[1], split_dims, thresholds).encode(X, path)


def scan(codes, params: LutParams, path: str | None = None) -> np.ndarray:
    """float32 [N, M] from codes [N, C] with `params`' tables, scale, offsets, bias, relu."""
    return Plan(params).scan(codes, path)


def apply(X, params: LutParams, path: str | None = None) -> np.ndarray:
    """LutMatMul on float32 X [..., D]: float32 [..., M]."""
    return Plan(params).apply(X, path)
