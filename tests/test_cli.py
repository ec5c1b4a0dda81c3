"""The command line on the shipped model, its errors, and what a failure leaves behind."""
from __future__ import annotations

import resource
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

import lutcompile
from lutcompile.compile import calibrate
from lutcompile.tools import cli
from lutcompile.ops.node_format import geometry_from_node, params_from_node
from lutcompile.ops.spec import DOMAIN, apply_conv_reference, apply_reference

ROOT = Path(__file__).resolve().parent.parent
MODEL = ROOT / "models/mnist_mlp.onnx"
CALIB = ROOT / "models/mnist_calib.npz"
TEST = ROOT / "models/mnist_test.npz"
CNN = ROOT / "models/fashion_cnn.onnx"
CNN_CALIB = ROOT / "models/fashion_calib.npz"
CNN_TEST = ROOT / "models/fashion_test.npz"


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "lutcompile", *map(str, args)],
                          capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def compiled_mlp(tmp_path_factory):
    out = tmp_path_factory.mktemp("cli") / "fast.onnx"
    proc = run_cli(MODEL, "--calib", CALIB, "-o", out, "--codebooks", "8", "--eval", TEST, "-q")
    return proc, out


@pytest.mark.slow
def test_cli_compiles_the_shipped_model(compiled_mlp):
    proc, out = compiled_mlp
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0].split() == ["node", "op", "D", "x", "M", "C", "partition", "tables", "act", "rel.err",
                                 "columns"]
    assert any(l.startswith("/0/Gemm") and "784 x 200" in l and l.endswith("/200") for l in lines)
    assert any(l.startswith("/6/Gemm") and "200 x 10" in l and l.endswith("all") for l in lines)
    assert any(l.startswith("calibration accuracy: original 99.95%") for l in lines)
    assert any(l.startswith("held-out accuracy:    original 98.60%") for l in lines)
    model = onnx.load(str(out))
    assert [n.op_type for n in model.graph.node] == ["LutMatMul"] * 4


def lookup_values_in_onnxruntime(model: onnx.ModelProto, x: np.ndarray) -> dict[str, np.ndarray]:
    """Each lookup node's input and output as onnxruntime, with our kernel, computes them on x
    (the compiler's own activation collection, which test_pipeline checks against numpy)."""
    names = [t for n in model.graph.node if n.domain == DOMAIN for t in (n.input[0], n.output[0])]
    data = calibrate.load_calibration({"input": x}, model)
    return calibrate.collect_activations(model, data, {t: (t, np.asarray) for t in names}, batch_size=len(x))


@pytest.mark.slow
def test_cli_output_runs_in_onnxruntime_and_matches_reference(compiled_mlp):
    _, out = compiled_mlp
    model = onnx.load(str(out))
    values = lookup_values_in_onnxruntime(model, np.load(TEST)["input"][:500])
    for n in model.graph.node:  # each node, on the input onnxruntime gave it
        want = apply_reference(values[n.input[0]], params_from_node(n))
        np.testing.assert_allclose(values[n.output[0]], want, rtol=1e-6, atol=1e-6)


@pytest.fixture(scope="module")
def compiled_cnn(tmp_path_factory):
    """The shipped CNN compiled by the command line, with options that keep the test short."""
    folder = tmp_path_factory.mktemp("cli_cnn")
    calib = np.load(CNN_CALIB)
    np.savez(folder / "calib.npz", input=calib["input"][:600], labels=calib["labels"][:600])
    out = folder / "fast_cnn.onnx"
    proc = run_cli(CNN, "--calib", folder / "calib.npz", "-o", out, "--codebooks", "8", "--partition",
                   "contiguous", "--table-loss", "ridge", "--no-finetune", "-q")
    return proc, out


@pytest.mark.slow
def test_cli_compiles_the_shipped_cnn_and_matches_the_reference(compiled_cnn):
    """Every eligible Conv and Gemm replaced, the too-small first Conv kept with its reason, the
    interface unchanged, and each lookup node in onnxruntime equal to the numpy reference on
    the input onnxruntime gave it."""
    proc, out = compiled_cnn
    assert proc.returncode == 0, proc.stderr
    assert "kept exact: /0/Conv (Conv): patch of 1x3x3 = 9 inputs is too small" in proc.stdout
    original, model = onnx.load(str(CNN)), onnx.load(str(out))
    assert [(n.name, n.op_type) for n in model.graph.node if n.domain == "ai.lutcompile"] == [
        ("/3/Conv", "LutConv"), ("/6/Conv", "LutConv"), ("/10/Gemm", "LutMatMul"), ("/12/Gemm", "LutMatMul")]
    assert [n.op_type for n in model.graph.node if n.op_type in ("Conv", "Gemm", "MatMul")] == ["Conv"]
    assert model.graph.input == original.graph.input and model.graph.output == original.graph.output
    values = lookup_values_in_onnxruntime(model, np.load(CNN_TEST)["input"][:64])
    for n in model.graph.node:
        if n.op_type == "LutConv":
            want = apply_conv_reference(values[n.input[0]], params_from_node(n), geometry_from_node(n))
        elif n.op_type == "LutMatMul":
            want = apply_reference(values[n.input[0]], params_from_node(n))
        else:
            continue
        np.testing.assert_allclose(values[n.output[0]], want, rtol=1e-6, atol=1e-6, err_msg=n.name)


@pytest.mark.slow
def test_cli_reported_accuracy_is_onnxruntime_accuracy(compiled_mlp):
    proc, out = compiled_mlp
    test = np.load(TEST)
    sess = ort.InferenceSession(str(out), lutcompile.session_options(), providers=["CPUExecutionProvider"])
    acc = np.mean(sess.run(None, {"input": test["input"]})[0].argmax(1) == test["labels"])
    line = next(l for l in proc.stdout.splitlines() if l.startswith("held-out accuracy"))
    assert line.endswith(f"compiled {acc:.2%}")


def few_rows(folder: Path, rows: int) -> Path:
    """The first `rows` rows of the calibration file, as a new .npz."""
    with np.load(CALIB) as npz:
        np.savez(folder / "few.npz", **{k: npz[k][:rows] for k in npz.files})
    return folder / "few.npz"


@pytest.mark.bad_input
@pytest.mark.parametrize("make_args,code,message", [
    (lambda t: [t / "missing.onnx", "--calib", CALIB, "-o", t / "o.onnx"], cli.EXIT_MODEL, "not found"),
    (lambda t: [CALIB, "--calib", CALIB, "-o", t / "o.onnx"], cli.EXIT_MODEL, "not an ONNX model"),
    (lambda t: [MODEL, "--calib", t / "none.npz", "-o", t / "o.onnx"], cli.EXIT_DATA, "not found"),
    (lambda t: [MODEL, "--calib", CALIB, "-o", t / "no/such/dir/o.onnx"], cli.EXIT_OUTPUT, "does not exist"),
    (lambda t: [MODEL, "--calib", CALIB, "-o", MODEL], cli.EXIT_OUTPUT, "is the input"),
    # 16 codebooks x 16 table entries: 256 rows; checked before the first fit
    (lambda t: [MODEL, "--calib", few_rows(t, 255), "-o", t / "o.onnx"], cli.EXIT_DATA,
     "node /0/Gemm gets 255 calibration rows; 16 codebook(s) need at least 256"),
    (lambda t: [MODEL, "--calib", few_rows(t, 40), "-o", t / "o.onnx", "-C", "3"], cli.EXIT_DATA,
     "need at least 48"),
])
def test_cli_errors_are_one_line_with_distinct_status(tmp_path, make_args, code, message):
    proc = run_cli(*make_args(tmp_path))
    assert proc.returncode == code, proc.stderr
    err = proc.stderr.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("lutcompile: error:") and message in err[0], err
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "o.onnx").exists()


@pytest.mark.parametrize("options,partition,tables", [
    (["--partition", "r2", "--table-loss", "mse", "--no-finetune"], "r2", ["mse"] * 4),
    (["--partition", "contiguous", "--table-loss", "ridge", "--finetune-tables"], "contiguous", ["ridge"] * 4),
])
def test_cli_fit_options_reach_the_nodes(tmp_path, options, partition, tables):
    out = tmp_path / "o.onnx"
    proc = run_cli(MODEL, "--calib", CALIB, "-o", out, "--codebooks", "2", "-q", *options)
    assert proc.returncode == 0, proc.stderr
    model = onnx.load(str(out))
    attrs = [{a.name: onnx.helper.get_attribute_value(a) for a in n.attribute} for n in model.graph.node]
    assert [a["partition"].decode() for a in attrs] == [partition] * 4
    assert [a["table_loss"].decode() for a in attrs] == tables
    stages = [l for l in proc.stdout.splitlines() if l.startswith("calibration accuracy ")]
    if "--no-finetune" in options:
        assert stages == []
    else:
        assert stages[-1].startswith("calibration accuracy tables fine-tuned")


def run_cli_on_a_terminal(*args):
    """Run the CLI with stderr on a pseudo-terminal (100 columns); (status, stdout, stderr)."""
    import fcntl
    import os
    import pty
    import struct
    import termios
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))
    proc = subprocess.Popen([sys.executable, "-m", "lutcompile", *map(str, args)], stdout=subprocess.PIPE,
                            stderr=slave)
    os.close(slave)
    chunks = []
    while True:
        try:
            data = os.read(master, 65536)
        except OSError:  # the child closed the terminal
            break
        if not data:
            break
        chunks.append(data)
    out = proc.stdout.read().decode()
    proc.wait(timeout=600)
    os.close(master)
    return proc.returncode, out, b"".join(chunks).decode(errors="replace")


def test_cli_progress_bars_on_a_terminal_unless_quiet_and_verbose_logging(tmp_path):
    fast = ["--calib", CALIB, "-o", tmp_path / "o.onnx", "-C", "2", "--partition", "contiguous",
            "--table-loss", "ridge", "--no-finetune"]
    code, out, err = run_cli_on_a_terminal(MODEL, *fast, "-v")
    assert code == 0, err
    assert "fit:" in err and "%|" in err  # tqdm's bar
    assert "INFO lutcompile: fitted /0/Gemm: 784x200 C=2 ridge" in err
    assert "INFO lutcompile: stage fit:" in err
    code, out, err = run_cli_on_a_terminal(MODEL, *fast, "--quiet")
    assert code == 0, err
    assert "%|" not in err and "INFO" not in err
    assert out.splitlines()[-1] == f"wrote {tmp_path / 'o.onnx'}"


def run_until_interrupted(args, when: str):
    """Start the CLI (-v), send SIGINT once a stderr line contains `when`; (status, stderr lines)."""
    # a runner started in the background (nohup, &) ignores SIGINT, and its children inherit
    # that: the CLI is started with the default handler, as a terminal would start it
    proc = subprocess.Popen([sys.executable, "-m", "lutcompile", *map(str, args), "-v"], stderr=subprocess.PIPE,
                            stdout=subprocess.DEVNULL, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    lines = []
    for line in proc.stderr:
        lines.append(line.rstrip("\n"))
        if when in line:
            proc.send_signal(signal.SIGINT)
            break
    lines += proc.stderr.read().splitlines()
    return proc.wait(timeout=600), lines


@pytest.mark.slow
@pytest.mark.parametrize("options", [["--no-finetune"], []], ids=["mid-fit", "mid-finetune"])
def test_ctrl_c_leaves_no_output_and_the_input_untouched(tmp_path, options):
    """Ctrl-C after the first node is fitted (during the next fits, or the fine-tune pass that
    follows): exit 130 with one line, no model, no report, no temporary file; input intact."""
    model = tmp_path / "in.onnx"
    shutil.copy(MODEL, model)
    status, lines = run_until_interrupted([model, "--calib", CALIB, "-o", tmp_path / "out.onnx", "-q",
                                           "--report", tmp_path / "report", *options], "fitted /0/Gemm")
    assert status == cli.EXIT_INTERRUPTED, lines
    assert [l for l in lines if not l.startswith("INFO ")] == ["lutcompile: interrupted"]
    assert model.read_bytes() == MODEL.read_bytes()
    assert [p.name for p in tmp_path.iterdir()] == ["in.onnx"]  # nor any .lutcompile-*.tmp


@pytest.mark.slow
def test_a_write_that_fails_midway_leaves_the_previous_output(tmp_path):
    """The output write hits the file-size limit (EFBIG, as a full disk would fail it) after
    16 KiB of the ~57 KiB model: exit 5 with one line; the previous output file is intact and
    no temporary file is left."""
    out = tmp_path / "out.onnx"
    out.write_bytes(b"the previous output")

    def limit_file_size():
        resource.setrlimit(resource.RLIMIT_FSIZE, (16 << 10, 16 << 10))
    proc = subprocess.run([sys.executable, "-m", "lutcompile", MODEL, "--calib", CALIB, "-o", out, "-q",
                           "--no-finetune", "--partition", "contiguous", "--table-loss", "ridge"],
                          capture_output=True, text=True, timeout=600, preexec_fn=limit_file_size)
    assert proc.returncode == cli.EXIT_OUTPUT, proc.stderr
    assert proc.stderr.splitlines() == [f"lutcompile: error: cannot write {out}: File too large"]
    assert out.read_bytes() == b"the previous output"
    assert [p.name for p in tmp_path.iterdir()] == ["out.onnx"]
