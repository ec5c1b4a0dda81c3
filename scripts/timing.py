"""Latency of onnxruntime sessions for the scripts: the product's own measurement
(`lutcompile.timing`), so the budget search's cost model and the published tables time
models the same way."""
from lutcompile.timing import interleaved_medians, model_latencies, node_times  # noqa: F401
