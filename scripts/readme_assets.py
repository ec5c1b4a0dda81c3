"""The README's "See what the compiler did" material: a `lutcompile diff` excerpt, an `inspect`
listing and a screenshot of the compile report.

    python scripts/readme_assets.py [--codebooks 16] [--keep DIR] [--no-readme]

Compiles the shipped MLP with the compiler's default options (fitted on models/mnist_calib.npz,
with its report), runs `lutcompile diff` of the original against the compiled model on the
held-out rows of models/mnist_test.npz and `lutcompile inspect` on the compiled one, exactly as
the command line prints them, and screenshots report.html in headless Chromium. Writes
docs/results/report_screenshot.png and the README sections diff_example, inspect_example and
report_screenshot. Needs chromium (Debian: apt-get install chromium).
"""
from __future__ import annotations

import argparse
import contextlib
import io
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

from lutcompile.tools import cli
from readme_tables import update_readme

ROOT = Path(__file__).resolve().parent.parent
SCREENSHOT = ROOT / "docs/results/report_screenshot.png"


def run_cli(*args: str) -> tuple[int, str]:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = cli.main(list(args))
    return code, out.getvalue()


def screenshot(html: Path, png: Path, width: int, height: int) -> None:
    binary = shutil.which("chromium") or shutil.which("chromium-browser")
    if binary is None:
        raise SystemExit("chromium is needed for the screenshot (Debian: apt-get install chromium)")
    with tempfile.TemporaryDirectory() as profile:
        proc = subprocess.run([binary, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                               "--no-first-run", "--disable-background-networking", "--disable-component-update",
                               "--disable-sync", f"--user-data-dir={profile}", "--hide-scrollbars",
                               f"--window-size={width},{height}", f"--screenshot={png}", html.resolve().as_uri()],
                              capture_output=True, text=True, timeout=180)
    if proc.returncode != 0 or not png.exists():
        raise SystemExit(f"chromium failed ({proc.returncode}): {proc.stderr[-1000:]}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--codebooks", default="16", help="codebooks per node (the compiler's default: 16)")
    p.add_argument("--model", default="models/mnist_mlp.onnx")
    p.add_argument("--calib", default="models/mnist_calib.npz")
    p.add_argument("--test", default="models/mnist_test.npz")
    p.add_argument("--keep", metavar="DIR", help="keep the compiled model and the report in DIR")
    p.add_argument("--reuse", action="store_true",
                   help="with --keep: reuse the model and report a previous run left in DIR")
    p.add_argument("--size", default="1280x900", help="screenshot size, WIDTHxHEIGHT")
    p.add_argument("--no-readme", action="store_true")
    args = p.parse_args()
    os.chdir(ROOT)  # the README shows paths relative to the repository
    work = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="lutcompile-assets-"))
    work.mkdir(parents=True, exist_ok=True)
    fast, report = work / "fast.onnx", work / "report"

    compile_args = [args.model, "--calib", args.calib, "-o", str(fast), "--codebooks", args.codebooks,
                    "--eval", args.test, "--report", str(report), "-q"]
    if not (args.reuse and args.keep and fast.exists() and (report / "report.html").exists()):
        code, text = run_cli(*compile_args)
        print(text, end="")
        if code != 0:
            raise SystemExit(f"compile failed with status {code}")

    code, diff_text = run_cli("diff", args.model, str(fast), "--calib", args.test)
    if code != 0:
        raise SystemExit(f"lutcompile diff failed with status {code}")
    code, inspect_text = run_cli("inspect", str(fast))
    if code != 0:
        raise SystemExit(f"lutcompile inspect failed with status {code}")
    print(diff_text + inspect_text, end="")

    width, height = (int(v) for v in args.size.split("x"))
    SCREENSHOT.parent.mkdir(parents=True, exist_ok=True)
    screenshot(report / "report.html", SCREENSHOT, width, height)
    print(f"wrote {SCREENSHOT.relative_to(ROOT)}")

    if not args.no_readme:
        options = f"--codebooks {args.codebooks} " if args.codebooks != "16" else ""
        update_readme("diff_example", "```\n"
                      f"$ lutcompile {args.model} --calib {args.calib} -o fast.onnx {options}--report report\n"
                      f"$ lutcompile diff {args.model} fast.onnx --calib {args.test}\n"
                      f"{diff_text.rstrip()}\n```\n")
        update_readme("inspect_example", f"```\n$ lutcompile inspect fast.onnx\n{inspect_text.rstrip()}\n```\n")
        update_readme("report_screenshot",
                      f"![The compile report of the shipped MLP](docs/results/report_screenshot.png)\n\n"
                      f"The top of `report.html` for the compile above (`--report report`), in headless "
                      f"Chromium at {width}x{height}. Regenerate with `python scripts/readme_assets.py`.\n")
        print("updated README.md")
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
