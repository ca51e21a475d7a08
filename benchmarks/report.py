"""Shared by the benchmark scripts: write results as JSON and as a Markdown table in docs/benchmarks.md."""

from __future__ import annotations

import json
import os
import platform
import re
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "benchmarks.md"


def machine() -> dict:
    return {"platform": platform.platform(), "python": platform.python_version(), "cpus": os.cpu_count(),
            "date": time.strftime("%Y-%m-%d")}


def write(name: str, results: dict, table: str) -> None:
    """Save ``benchmarks/results/NAME.json`` and replace NAME's section of docs/benchmarks.md."""
    out = ROOT / "benchmarks" / "results" / f"{name}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"machine": machine(), **results}, indent=2) + "\n")
    begin, end = f"<!-- {name}:begin -->", f"<!-- {name}:end -->"
    text = DOC.read_text() if DOC.exists() else "# Benchmarks\n"
    block = f"{begin}\n{table.strip()}\n\n_{machine()['date']}, {machine()['cpus']} CPUs, `benchmarks/results/{name}.json`_\n{end}"
    if begin in text:
        text = re.sub(re.escape(begin) + ".*?" + re.escape(end), lambda _: block, text, flags=re.S)
    else:
        text = text.rstrip() + f"\n\n## {name}\n\n{block}\n"
    DOC.write_text(text)
    print(table)
