"""Regenerate a marked section of README.md from a script's results.

A section is the text between `<!-- NAME:start -->` and `<!-- NAME:end -->`; scripts that
produce README tables call `update_readme(NAME, markdown)` so the README never drifts from
what the scripts measured.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

README = Path(__file__).resolve().parent.parent / "README.md"


def update_readme(name: str, markdown: str, readme: Path = README) -> None:
    text = readme.read_text()
    start, end = f"<!-- {name}:start -->", f"<!-- {name}:end -->"
    pattern = re.compile(re.escape(start) + r".*?" + re.escape(end), re.S)
    if not pattern.search(text):
        raise SystemExit(f"{readme} has no section {start} ... {end}")
    readme.write_text(pattern.sub(lambda _: f"{start}\n{markdown.strip()}\n{end}", text))


def publish(name: str, folder: Path, results: dict, parts: list[str], footer: str, readme: bool) -> None:
    """Write `results` to folder/results.json, print the tables `parts` with `footer`, and when
    `readme` (a full run, not a partial one) put them into README section `name`."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    text = "\n\n".join([*parts, footer])
    if readme:
        update_readme(name, text)
    print(text)
