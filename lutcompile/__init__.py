"""lutcompile: compile ONNX models so their matrix products become table lookups.

    import lutcompile, onnxruntime
    lutcompile.compile_model("model.onnx", "fast.onnx", "calib.npz", codebooks=16)
    so = onnxruntime.SessionOptions(); so.register_custom_ops_library(lutcompile.library_path())
    onnxruntime.InferenceSession("fast.onnx", so)
"""
from .kernel import library_path
from .api import CompileResult, NodeReport, compile_model, evaluate_accuracy
from .runtime import session_options

__all__ = ["compile_model", "CompileResult", "NodeReport", "evaluate_accuracy",
           "library_path", "session_options"]
__version__ = "0.1.0"
