"""The fuzz cases of tests/fuzz_cases.py against the custom-op library built with AddressSanitizer
and UndefinedBehaviorSanitizer, on every kernel path this CPU has.

    python scripts/sanitize.py [--no-readme]

1. Builds the onnxruntime library from custom_ops/ with the product's flags plus
   -fsanitize=address,undefined into build/sanitize/ (the normal build is left alone).
2. Checks that the set-up catches a bug at all: a library with a one-byte heap overflow must
   be reported by AddressSanitizer and counted as a crash.
3. Runs every fuzz case in child Python processes with the sanitizer runtime preloaded, once
   per kernel path (LUTCOMPILE_KERNEL_PATH=scalar, avx2, avx512). Any sanitizer report aborts
   the child, which counts as a crash of that case.
4. Counts the tests marked `bad_input` (bad models, data, options and attributes fed to the
   command line, the API and the kernel) and writes the README's reliability section.

Exits 1 unless every path is clean: no crash, no sanitizer report, no wrong verdict.
"""
from __future__ import annotations

import argparse
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests"), str(ROOT / "custom_ops")]

from build_ffi import COMPILE_ARGS, INCLUDE_DIRS, KERNEL_SOURCES, LIBRARIES, ORT_SOURCES  # noqa: E402
from fuzz_cases import CASES, build_base_models, run_isolated  # noqa: E402
from readme_tables import update_readme  # noqa: E402

from lutcompile.ops import kernel  # noqa: E402
from lutcompile.tools import cli  # noqa: E402

BUILD = ROOT / "build" / "sanitize"
SANITIZE_FLAGS = ["-g", "-fsanitize=address,undefined", "-fno-omit-frame-pointer", "-fno-sanitize-recover=undefined"]
# detect_leaks=0: the Python interpreter itself leaks by design; abort_on_error=1: a report
# kills the child with SIGABRT, so it is counted as a crash
ASAN_OPTIONS = "detect_leaks=0:abort_on_error=1"
UBSAN_OPTIONS = "print_stacktrace=1:halt_on_error=1:abort_on_error=1"
REPORT = re.compile(r"ERROR: AddressSanitizer|runtime error:|ERROR: LeakSanitizer")

CANARY = r"""
#include <stdlib.h>
__attribute__((visibility("default"))) void *RegisterCustomOps(void *options, const void *api) {
    volatile char *buffer = malloc(16);
    buffer[16] = 1; /* one byte past the end */
    free((void *)buffer);
    return 0;
}
"""


def compile_command(sources: list[str], output: Path) -> list[str]:
    return ["gcc", "-shared", "-fPIC", *COMPILE_ARGS, *SANITIZE_FLAGS, *(f"-I{d}" for d in INCLUDE_DIRS),
            *sources, *(f"-l{lib}" for lib in LIBRARIES), "-o", str(output)]


def gcc_library(name: str) -> str:
    return subprocess.run(["gcc", f"-print-file-name={name}"], check=True, capture_output=True,
                          text=True).stdout.strip()


def sanitizer_env(path: str | None = None) -> dict[str, str]:
    """The sanitizer runtime preloaded into Python, and libstdc++ with it: AddressSanitizer
    finds the real __cxa_throw at start-up, and onnxruntime throws C++ exceptions."""
    preload = f"{gcc_library('libasan.so')} {gcc_library('libstdc++.so.6')}"
    env = {"LD_PRELOAD": preload, "ASAN_OPTIONS": ASAN_OPTIONS, "UBSAN_OPTIONS": UBSAN_OPTIONS}
    if path is not None:
        env["LUTCOMPILE_KERNEL_PATH"] = path
    return env


def bad_input_tests() -> int:
    """The tests marked bad_input, each parametrised case counted once."""
    out = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-m", "bad_input", "tests"],
                         cwd=ROOT, capture_output=True, text=True, check=True).stdout
    return sum(1 for line in out.splitlines() if "::" in line)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--no-readme", action="store_true")
    args = p.parse_args()
    BUILD.mkdir(parents=True, exist_ok=True)
    library = BUILD / "_lutops_sanitized.so"
    command = compile_command(KERNEL_SOURCES + ORT_SOURCES, library)
    subprocess.run(command, cwd=ROOT, check=True)
    models = build_base_models(BUILD / "models")

    (BUILD / "canary.c").write_text(CANARY)
    subprocess.run(compile_command([str(BUILD / "canary.c")], BUILD / "canary.so"), check=True,
                   capture_output=True)  # (gcc rightly warns about the overflow)
    canary = run_isolated(models, str(BUILD / "canary.so"), sanitizer_env(), stop=1)
    if 0 not in canary.crashes or not REPORT.search(canary.stderr):
        print("the sanitizer set-up does not catch a heap overflow:\n" + canary.stderr[-2000:], file=sys.stderr)
        return 1
    print(f"canary: a one-byte heap overflow is caught ({canary.crashes[0]})")

    rows, clean = [], True
    plain = [("plain build, as in CI", kernel.library_path(), {})]
    sanitized = [(f"sanitized, `{path}` path", str(library), sanitizer_env(path)) for path in kernel.available_paths()]
    for name, lib, env in plain + sanitized:
        run = run_isolated(models, lib, env)
        reports = len(REPORT.findall(run.stderr))
        failures = run.failures()
        clean &= not failures and not reports and len(run.verdicts) == CASES
        rows.append(f"| {name} | {len(run.cases)} | {run.count('error')} | {run.count('ok')} | "
                    f"{len(run.crashes)} | {reports} | {len(failures)} | {run.seconds:.1f} s |")
        print(rows[-1])
        for line in failures[:20]:
            print("  " + line)
        if reports:
            print(run.stderr[-4000:])

    shown = " ".join(str(Path(c).relative_to(ROOT)) if c.startswith(str(ROOT)) else c for c in command)
    exit_statuses = cli._EPILOG.split("exit status:")[1].replace("\n", " ").strip()
    md = f"""Produced by `python scripts/sanitize.py`.

**Bad input gets a clear error.** The command line and the API answer bad input with one line
`lutcompile: error: ...` (a traceback only with `--debug`) and a distinct exit status:
{exit_statuses}. Output files are written to a temporary file and renamed into place, so a
failure or Ctrl-C at any stage leaves no partial file, and the input is never touched
(`tests/test_cli.py`). Too few calibration rows fail before any fitting, naming the minimum
(16 rows per codebook). Bad inputs tried: **{bad_input_tests()}** test cases (the tests
marked `bad_input`: models, data, options, output paths, attributes).

**A hostile model file cannot make the kernel read out of bounds.** `tests/fuzz_cases.py`
takes the compiled digits MLP (3 `LutMatMul` nodes), a small CNN (2 `LutConv`, 1
`LutMatMul`), two `SpnMatMul` layers and the CNN as sum-product layers (2 `SpnConv`, 1
`SpnMatMul`), and derives {CASES} cases with a fixed seed: attributes missing, of the wrong
type, of the wrong length, out of range (negative, zero, past `D`, overflowing int32 and
int64), NaN/inf scale, offsets and bias, table tensors of the wrong shape, dtype or encoding
(truncated or extra raw data, negative or huge dims), LutConv and SpnConv geometry out of
range, disagreeing with `D` or with an empty output, SpnMatMul's and SpnConv's packed ternary
weights with code 3, bits past a row or the wrong shape, extra or missing inputs and outputs,
another op type of the domain, damaged files, and inputs of the wrong rank, width, dtype or
size (zero rows included). Each case must end in an onnxruntime error
naming the node, or in a run whose every lookup node matches the numpy reference bit for bit;
a crash fails the case (`tests/test_fuzz.py` runs them in CI, in child processes).

The cases run against the plain library (as in CI) and against the library built with
AddressSanitizer and UndefinedBehaviorSanitizer,

    {shown}

run in Python with the sanitizer runtime (and libstdc++) preloaded, `ASAN_OPTIONS={ASAN_OPTIONS}`,
`UBSAN_OPTIONS={UBSAN_OPTIONS}`, once per kernel path of this CPU (`LUTCOMPILE_KERNEL_PATH`);
a sanitizer report aborts the child process, so it counts as a crash:

| library | fuzz cases | onnxruntime errors | runs matching the reference | crashes | sanitizer reports | wrong verdicts | time |
|---|---|---|---|---|---|---|---|
{chr(10).join(rows)}

Result: **{"clean" if clean else "NOT CLEAN"}**. The set-up is checked first: a library with a
one-byte heap overflow is reported and counted as a crash.

**Concurrency and determinism** (`tests/test_reliability.py`): one session of each compiled
model, shared by 8 Python threads running 1,000 times each on their own inputs, gives bitwise
the single-threaded results (which are bitwise the numpy reference runtime's); compiling the
digits MLP twice in fresh processes, with and without the fine-tune pass, gives byte-identical
files."""
    if not args.no_readme:
        update_readme("reliability", md)
    print("clean" if clean else "NOT CLEAN")
    return 0 if clean else 1


if __name__ == "__main__":
    sys.exit(main())
