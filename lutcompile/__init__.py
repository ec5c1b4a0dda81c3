"""lutcompile: compile ONNX models so their matrix products become table lookups.

    import lutcompile, onnxruntime
    lutcompile.compile_model("model.onnx", "fast.onnx", "calib.npz", codebooks=16)
    so = onnxruntime.SessionOptions(); so.register_custom_ops_library(lutcompile.library_path())
    onnxruntime.InferenceSession("fast.onnx", so)

The compiler (and torch, which it needs) is imported on first use, so serving code that only
wants `library_path()` or `session_options()` starts fast.
"""
from .ops.kernel import library_path

__all__ = ["compile_model", "CompileOptions", "CompileResult", "NodeReport", "evaluate_accuracy",
           "library_path", "session_options"]
__version__ = "0.1.0"

_LAZY = {"compile_model": "api", "CompileOptions": "api", "CompileResult": "api", "NodeReport": "api",
         "evaluate_accuracy": "api", "session_options": "onnx_io.sessions"}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib
        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module 'lutcompile' has no attribute {name!r}")
