"""The compile report: report.json holds every figure of the CompileResult; report.html is a
self-contained page whose plots render in headless Chromium."""
from __future__ import annotations

import dataclasses
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import matplotlib.image
import numpy as np
import pytest

import lutcompile
from lutcompile.tools import cli
from lutcompile.compile.finetune import FinetuneOptions
from lutcompile.tools.report import PLOTS, write_report

ROOT = Path(__file__).resolve().parent.parent
MODEL = ROOT / "models/mnist_mlp.onnx"
CALIB = ROOT / "models/mnist_calib.npz"


def chromium() -> str | None:
    return shutil.which("chromium") or next(
        (p for p in ("/usr/bin/chromium", "/usr/bin/chromium-browser") if Path(p).exists()), None)


def run_chromium(*args, tmp: Path) -> subprocess.CompletedProcess:
    binary = chromium()
    if binary is None:
        pytest.skip("chromium is not installed (CI installs Debian's chromium via .ci/run)")
    return subprocess.run([binary, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                           "--no-first-run", "--disable-background-networking", "--disable-component-update",
                           "--disable-sync", f"--user-data-dir={tmp / 'chromium-profile'}", *map(str, args)],
                          capture_output=True, text=True, timeout=120)


@pytest.fixture(scope="module")
def reported(tmp_path_factory):
    """A compile with the fine-tune pass (one epoch) on the last two layers, and its report."""
    folder = tmp_path_factory.mktemp("report") / "nested" / "report"
    result = lutcompile.compile_model(MODEL, None, CALIB, codebooks=4, partition="contiguous", table_loss="ridge",
                                      finetune=True, nodes_to_include=["/4/Gemm", "/6/Gemm"],
                                      finetune_options=FinetuneOptions(epochs=1), report_dir=folder,
                                      progress=False)
    return result, folder


def test_report_json_holds_every_figure_of_the_compile(reported):
    result, folder = reported
    data = json.loads((folder / "report.json").read_text())
    assert set(data) == {"schema", "lutcompile_version", "created", "calibration_rows", "accuracy", "stages", "training",
                         "seconds", "total_seconds", "options", "nodes", "skipped", "totals"}
    assert data["schema"] == "lutcompile.report/1" and data["lutcompile_version"] == lutcompile.__version__
    assert data["calibration_rows"] == result.calibration_rows == 2000
    assert data["accuracy"] == {"before": result.accuracy_before, "after": result.accuracy_after}
    assert data["stages"] == [{"stage": s, "accuracy": a} for s, a in result.stages]
    assert [s["stage"] for s in data["stages"]] == ["after /4/Gemm", "after /6/Gemm"]
    assert data["seconds"] == result.seconds and set(result.seconds) >= {"frontend", "calibrate", "fit", "finetune"}
    assert data["total_seconds"] == pytest.approx(sum(result.seconds.values()))
    assert data["nodes"] == [dataclasses.asdict(n) for n in result.nodes]
    assert [n["name"] for n in data["nodes"]] == ["/4/Gemm", "/6/Gemm"]
    assert data["skipped"] == [{"name": n, "op_type": "Gemm", "reason": "not in nodes_to_include"}
                               for n in ("/0/Gemm", "/2/Gemm")]
    assert data["options"]["codebooks"] == 4 and data["options"]["finetune"] is True
    assert data["options"]["nodes_to_include"] == ["/4/Gemm", "/6/Gemm"]
    assert data["options"]["finetune_options"]["epochs"] == 1
    assert data["options"] == json.loads(json.dumps(result.options))
    assert data["totals"] == {"nodes": 2, "skipped": 2,
                              "bytes_before": sum(n.bytes_before for n in result.nodes),
                              "bytes_after": sum(n.bytes_after for n in result.nodes)}


def test_report_html_is_self_contained_with_four_inline_plots(reported):
    _, folder = reported
    page = (folder / "report.html").read_text()
    assert page.startswith("<!DOCTYPE html>")
    for key in PLOTS:
        assert re.search(rf'<figure id="{key}"><svg[^>]*>', page), key
    assert page.count("<svg") == len(PLOTS) == 4
    # nothing to fetch: no scripts, stylesheets, images or frames from anywhere
    assert not re.search(r"<(script|link|img|iframe)\b", page)
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:|//|file:)""", page)
    assert "after /6/Gemm" in page and "not in nodes_to_include" in page


@pytest.mark.slow
def test_report_renders_in_headless_chromium_with_its_plots(reported, tmp_path):
    _, folder = reported
    url = (folder / "report.html").resolve().as_uri()
    proc = run_chromium("--dump-dom", url, tmp=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    dom = proc.stdout
    for key in PLOTS:  # each plot is in the rendered DOM, with drawn content
        figure = re.search(rf'<figure id="{key}">(.*?)</figure>', dom, re.S)
        assert figure and "<svg" in figure.group(1) and figure.group(1).count("<path") > 5, key
    assert "lutcompile compile report" in dom

    shot = tmp_path / "report.png"
    proc = run_chromium(f"--screenshot={shot}", "--window-size=1280,1000", "--hide-scrollbars", url, tmp=tmp_path)
    assert proc.returncode == 0 and shot.exists(), proc.stderr[-2000:]
    image = matplotlib.image.imread(str(shot))[..., :3]
    assert image.shape[:2] == (1000, 1280)
    assert image.std() > 0.05  # not a blank page
    # the plots' colours are on screen: error bars (#3b6ea8), stage line (#c0392b), bytes after (#27ae60)
    for rgb in ((0x3b, 0x6e, 0xa8), (0xc0, 0x39, 0x2b), (0x27, 0xae, 0x60)):
        close = np.all(np.abs(image * 255 - np.array(rgb)) < 12, axis=-1)
        assert close.sum() > 200, rgb


def test_report_without_labels_or_nodes_still_renders(reported, tmp_path):
    result, _ = reported
    bare = dataclasses.replace(result, nodes=[], stages=[], accuracy_before=None, accuracy_after=None)
    page = write_report(bare, tmp_path / "bare")
    data = json.loads((tmp_path / "bare" / "report.json").read_text())
    assert data["accuracy"] == {"before": None, "after": None} and data["nodes"] == []
    text = page.read_text()
    assert text.count("<svg") == 4 and "no node was replaced" in text and "no accuracy to plot" in text


def test_cli_report_option(tmp_path):
    report = tmp_path / "rep"
    # not a terminal and no --quiet: still no progress bars on stderr
    proc = subprocess.run([sys.executable, "-m", "lutcompile", MODEL, "--calib", CALIB, "-o", tmp_path / "o.onnx",
                           "-C", "2", "--partition", "contiguous", "--table-loss", "ridge", "--no-finetune",
                           "--include", "/0/Gemm", "--include", "/6/Gemm", "--report", report], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    assert "%|" not in proc.stderr and "\r" not in proc.stderr and "INFO" not in proc.stderr
    assert proc.stdout.splitlines()[-1] == f"wrote {report / 'report.html'} and report.json"
    data = json.loads((report / "report.json").read_text())
    rows = [l.split() for l in proc.stdout.splitlines() if l.startswith("/")]
    assert [(r[0], r[-2]) for r in rows] == [(n["name"], f"{n['relative_error']:.4f}") for n in data["nodes"]]
    assert [n["name"] for n in data["nodes"]] == ["/0/Gemm", "/6/Gemm"]
    assert [s["name"] for s in data["skipped"]] == ["/2/Gemm", "/4/Gemm"]
    assert data["stages"] == [] and data["options"]["finetune"] is False
    assert (report / "report.html").read_text().count("<svg") == 4


@pytest.mark.bad_input
def test_cli_report_path_that_is_a_file_fails_before_compiling(capsys, tmp_path):
    (tmp_path / "taken").write_text("")
    code = cli.main([str(MODEL), "--calib", str(CALIB), "-o", str(tmp_path / "o.onnx"),
                     "--report", str(tmp_path / "taken")])
    err = capsys.readouterr().err
    assert code == cli.EXIT_OUTPUT and "is not a directory" in err
    assert not (tmp_path / "o.onnx").exists()
