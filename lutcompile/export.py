"""Stage 6, export: write the compiled model atomically, so a failure leaves no partial file."""
from __future__ import annotations

import os
import tempfile

import onnx


class OutputError(ValueError):
    """The output path cannot be written."""


def check_output_path(output: str | os.PathLike, model_input: str | os.PathLike | None = None) -> str:
    output = os.fspath(output)
    folder = os.path.dirname(os.path.abspath(output))
    if not os.path.isdir(folder):
        raise OutputError(f"output directory does not exist: {folder}")
    if model_input is not None and os.path.exists(output) and os.path.samefile(output, model_input):
        raise OutputError(f"output {output} is the input model; choose another path")
    return output


def save_model(model: onnx.ModelProto, output: str | os.PathLike) -> None:
    """Serialise to a temporary file beside `output`, then rename it into place."""
    output = os.fspath(output)
    folder = os.path.dirname(os.path.abspath(output))
    fd, tmp = tempfile.mkstemp(prefix=".lutcompile-", suffix=".onnx.tmp", dir=folder)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(model.SerializeToString())
        os.replace(tmp, output)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
