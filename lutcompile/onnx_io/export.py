"""Stage 6, export: write the compiled model atomically, so a failure leaves no partial file."""
from __future__ import annotations

import os
import tempfile

import onnx

from . import external_data


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
    """Serialise to a temporary file beside `output`, then rename it into place.

    A model holding external tensors (see external_data.py) also gets `<output>.data`, written
    and renamed the same way before the model file, so the model never points at missing data.
    """
    output = os.fspath(output)
    folder = os.path.dirname(os.path.abspath(output))
    temporaries: list[str] = []

    def temporary() -> str:
        fd, tmp = tempfile.mkstemp(prefix=".lutcompile-", suffix=".tmp", dir=folder)
        os.close(fd)
        temporaries.append(tmp)
        return tmp

    try:
        renames = []
        if external_data.attached_initializers(model):
            location = os.path.basename(output) + ".data"
            data_tmp = temporary()
            model = external_data.write_data_file(model, data_tmp, location)
            renames.append((data_tmp, os.path.join(folder, location)))
        model_tmp = temporary()
        with open(model_tmp, "wb") as f:
            f.write(model.SerializeToString())
        renames.append((model_tmp, output))
        for tmp, final in renames:
            os.replace(tmp, final)
    except OSError as exc:  # a full disk, a read-only folder: a bad output path, not a bug
        raise OutputError(f"cannot write {output}: {exc.strerror or exc}") from exc
    finally:
        for tmp in temporaries:
            if os.path.exists(tmp):
                os.unlink(tmp)


def write_atomic(path: str | os.PathLike, data: bytes) -> None:
    """Write `data` to a temporary file beside `path`, then rename it into place: a failure or
    an interrupt leaves `path` as it was and no temporary file behind."""
    path = os.fspath(path)
    fd, tmp = tempfile.mkstemp(prefix=".lutcompile-", suffix=".tmp", dir=os.path.dirname(os.path.abspath(path)))
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
