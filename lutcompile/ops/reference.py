"""A pure-Python reference runtime for compiled models: onnx.reference with LutMatMul in numpy.

It shares no code with onnxruntime or our C kernel, so tests (and users who doubt a result)
can run a compiled model through it and compare.
"""
from __future__ import annotations

import numpy as np
import onnx
from onnx.reference import ReferenceEvaluator
from onnx.reference.op_run import OpRun

from .spec import DOMAIN, apply_conv_reference, apply_reference
from .node_format import geometry_from_node, params_from_node


class LutMatMul(OpRun):
    """LutMatMul evaluated by `apply_reference` (the class name is the op type)."""

    op_domain = DOMAIN

    def _run(self, X, **_attributes):
        params = params_from_node(self.onnx_node)
        return (apply_reference(np.asarray(X, dtype=np.float32), params),)


class LutConv(OpRun):
    """LutConv evaluated by `apply_conv_reference`."""

    op_domain = DOMAIN

    def _run(self, X, **_attributes):
        node = self.onnx_node
        return (apply_conv_reference(np.asarray(X, dtype=np.float32), params_from_node(node),
                                     geometry_from_node(node)),)


def reference_evaluator(model: onnx.ModelProto) -> ReferenceEvaluator:
    return ReferenceEvaluator(model, new_ops=[LutMatMul, LutConv])
