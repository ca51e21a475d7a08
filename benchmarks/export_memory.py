"""Peak memory and time of an ONNX export, float / int8 / int4: the in-memory path against the streaming one.

Each export runs in its own process, measured from a fresh wrapper process that reports
``getrusage(RUSAGE_CHILDREN)`` (peak RSS of the export, file-backed pages included) and the wall time.
The streaming export is the command users run, ``pure-lite export`` (``python -m pure_lite.cli
export``); the in-memory one is ``export_onnx(..., streaming=False)``, which the CLI does not offer.
The two run alternately, one at a time, on:

- mid: the mid-size random Chameleon of benchmarks/end_to_end.py (hidden 1024, 8 layers,
  vocabulary 73728, float32 safetensors, 1.0 GB)
- 7B-width checkpoints with 2 and 3 layers (hidden 4096, 32 heads, intermediate 11008,
  vocabulary 73728, bfloat16 like the released weights, the release's VQ width); the difference
  between them is one 7B layer, and the table extrapolates that slope to 32 layers.

The in-memory path grows by gigabytes per 7B layer, far above the noise of one run. The streaming
path holds a chunk of one tensor at a time, so one layer more changes it by less than the run-to-run
noise: its runs are repeated (medians), and its per-layer growth is also measured where it can be
seen, streaming int4 exports of two narrow checkpoints (hidden 256) 14 layers apart. What grows with
depth in a streaming export (the traced graphs) does not depend on the width; its 7B rows use the
larger of the two slopes.

    python benchmarks/export_memory.py [--workdir /tmp/pure-lite-export-bench] [--wide-layers 2,3] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

import report

QUANTS = ("float", "int8", "int4")
PATHS = ("in-memory", "streaming")
FULL_LAYERS = 32
DEPTH_LAYERS = (2, 16)

# Runs ARGV as a child and prints its peak RSS (kB) and wall time: this wrapper is small and has
# waited on no other child, so RUSAGE_CHILDREN is the export's own high-water mark.
_MEASURE = """
import resource, subprocess, sys, time
t = time.perf_counter()
rc = subprocess.run(sys.argv[1:], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
wall = time.perf_counter() - t
print(rc.returncode, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, wall)
sys.stderr.write(rc.stderr[-2000:] if rc.returncode else "")
"""


def measure(cmd: list[str]) -> dict:
    proc = subprocess.run([sys.executable, "-c", _MEASURE, *cmd], capture_output=True, text=True)
    rc, max_kb, wall = proc.stdout.split()
    if int(rc):
        return {"failed": int(rc), "stderr": proc.stderr[-500:]}
    return {"peak_rss_gb": int(max_kb) * 1024 / 1e9, "seconds": float(wall)}


def export_command(path: str, ckpt: Path, out: Path, quant: str) -> list[str]:
    if path == "streaming":
        return [sys.executable, "-m", "pure_lite.cli", "export", str(ckpt), "-o", str(out), "--quant",
                "none" if quant == "float" else quant]
    call = (f"from pure_lite.export import export_onnx; export_onnx({str(ckpt)!r}, {str(out)!r}, "
            f"quantization={None if quant == 'float' else quant!r}, streaming=False)")
    return [sys.executable, "-c", call]


def folder_gb(path: Path) -> float:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) / 1e9


def make_checkpoints(work: Path, wide_layers: list[int]) -> dict[str, Path]:
    """Build the checkpoints once, each in a subprocess (building a 7B-width model takes several GB)."""
    specs = {"mid": dict(hidden_size=1024, num_layers=8, num_heads=16, intermediate_size=2816,
                         vq_base_channels=32, dtype="float32", max_shard_size="10MB")}
    for n in wide_layers:
        specs[f"7B-width, {n} layers"] = dict(hidden_size=4096, num_layers=n, num_heads=32, intermediate_size=11008,
                                              vq_base_channels=128, dtype="bfloat16", max_shard_size="2GB")
    for n in DEPTH_LAYERS:
        specs[f"narrow, {n} layers"] = dict(hidden_size=256, num_layers=n, num_heads=4, intermediate_size=704,
                                            vq_base_channels=32, dtype="bfloat16", max_shard_size="2GB")
    out = {}
    for name, kwargs in specs.items():
        path = work / name.replace(", ", "-").replace(" ", "")
        if not (path / "config.json").exists():
            code = ("from pure_lite.testing import make_tiny_checkpoint; "
                    f"make_tiny_checkpoint({str(path)!r}, seed=0, layout='pure', init_std=0.02, "
                    f"max_position_embeddings=8192, **{kwargs!r})")
            subprocess.run([sys.executable, "-c", code], check=True, stdout=subprocess.DEVNULL)
        out[name] = path
    return out


def run_export(work: Path, path: str, ckpt: Path, quant: str, repeats: int) -> dict:
    """Median peak RSS and time of ``repeats`` exports (each in its own process), with every run kept."""
    runs = []
    for _ in range(repeats):
        out = work / "out"
        shutil.rmtree(out, ignore_errors=True)
        r = measure(export_command(path, ckpt, out, quant))
        if "peak_rss_gb" not in r:
            return r
        r["output_gb"] = folder_gb(out)
        shutil.rmtree(out, ignore_errors=True)
        runs.append(r)
    return {key: statistics.median(r[key] for r in runs) for key in ("peak_rss_gb", "seconds")} | {"runs": runs}


def depth_slope(depth: dict) -> dict:
    """Per-layer growth of the streaming export where width does not count: narrow checkpoints far apart."""
    (a, ra), (b, rb) = sorted(depth.items())
    if "peak_rss_gb" not in ra or "peak_rss_gb" not in rb:
        return {}
    return {key: (rb[key] - ra[key]) / (b - a) for key in ("peak_rss_gb", "seconds")}


def extrapolate(results: dict, wide_layers: list[int], depth: dict) -> dict:
    """Peak RSS at 32 layers: the per-layer slope between the two 7B-width runs, carried on.

    For the streaming path the slope is at least the narrow checkpoints' (``depth``). Times are not
    extrapolated: one layer changes them by less than the run-to-run noise of either path.
    """
    (a, b) = wide_layers[0], wide_layers[-1]
    out = {}
    for quant in QUANTS:
        for path in PATHS:
            ra = results.get(f"7B-width, {a} layers", {}).get(quant, {}).get(path, {})
            rb = results.get(f"7B-width, {b} layers", {}).get(quant, {}).get(path, {})
            if "peak_rss_gb" not in ra or "peak_rss_gb" not in rb:
                continue
            measured = (rb["peak_rss_gb"] - ra["peak_rss_gb"]) / (b - a)
            slope = max(measured, depth.get("peak_rss_gb", measured)) if path == "streaming" else measured
            # A slope at or below zero (noise, or a streaming peak that does not grow with depth) is
            # reported as flat: never below what the deeper checkpoint measured.
            slope = max(slope, 0.0)
            peak = max(rb["peak_rss_gb"], rb["peak_rss_gb"] + (FULL_LAYERS - b) * slope)
            out.setdefault(quant, {})[path] = {"peak_rss_gb": peak,
                                               "per_layer_measured_gb": measured, "per_layer_used_gb": slope}
    return out


def _cell(r: dict, key: str, fmt: str) -> str:
    if key in r:
        return format(r[key], fmt)
    return f"failed ({r['failed']})" if "failed" in r else "-"


def table(results: dict, extrapolated: dict, checkpoints: dict) -> str:
    rows = ["| checkpoint | export | peak RSS in-memory (GB) | peak RSS streaming (GB) | ratio | "
            "time in-memory (s) | time streaming (s) | ratio |",
            "| --- | --- | --- | --- | --- | --- | --- | --- |"]

    def add(name: str, quant: str, old: dict, new: dict, fmt_rss: str = ".2f") -> None:
        rss = f"{old['peak_rss_gb'] / new['peak_rss_gb']:.1f}x" if "peak_rss_gb" in old and "peak_rss_gb" in new else "-"
        speed = f"{old['seconds'] / new['seconds']:.2f}x" if "seconds" in old and "seconds" in new else "-"
        rows.append(f"| {name} | {quant} | {_cell(old, 'peak_rss_gb', fmt_rss)} | {_cell(new, 'peak_rss_gb', fmt_rss)} | "
                    f"{rss} | {_cell(old, 'seconds', '.0f')} | {_cell(new, 'seconds', '.0f')} | {speed} |")

    for name, by_quant in results.items():
        for quant, r in by_quant.items():
            add(f"{name} ({checkpoints[name]['gb']:.1f} GB on disk)", quant, r.get("in-memory", {}), r.get("streaming", {}))
    for quant, r in extrapolated.items():
        add(f"**7B, {FULL_LAYERS} layers (extrapolated)**", quant, r.get("in-memory", {}), r.get("streaming", {}), ".1f")
    return "\n".join(rows)


def render(data: dict, repeats: int) -> None:
    """Extrapolate, then write the JSON and the table of docs/benchmarks.md."""
    results, depth, checkpoints = data["results"], data["depth"], data["checkpoints"]
    wide = sorted(int(name.split(", ")[1].split()[0]) for name in results if name.startswith("7B-width"))
    slope = depth_slope({int(n): r for n, r in depth.items()})
    extrapolated = extrapolate(results, [wide[0], wide[-1]], slope)
    noise = max((max(r["peak_rss_gb"] for r in by_path["streaming"]["runs"])
                 - min(r["peak_rss_gb"] for r in by_path["streaming"]["runs"]))
                for by_quant in results.values() for by_path in by_quant.values() if "runs" in by_path["streaming"])
    a, b = sorted(int(n) for n in depth)
    doc = (f"Peak RSS (file-backed pages included) and wall time of one export per process; in-memory = "
           f"`export_onnx(streaming=False)` (load the float32 model in torch, quantize the saved float graphs with "
           f"ONNX Runtime's quantizer; one run each), streaming = `pure-lite export` (median of {repeats} runs). "
           f"7B rows: peak RSS carried from the {wide[-1]}-layer 7B-width checkpoint to {FULL_LAYERS} layers with "
           f"the per-layer slope between the {wide[0]}- and {wide[-1]}-layer ones. For streaming that slope is "
           f"run-to-run noise (runs of one checkpoint differ by up to {1000 * noise:.0f} MB), so the slope used is "
           f"the larger of it and the one measured on narrow checkpoints {b - a} layers apart (hidden 256, {a} and "
           f"{b} layers, int4: {1000 * slope.get('peak_rss_gb', float('nan')):.1f} MB and "
           f"{slope.get('seconds', float('nan')):.1f} s per layer): "
           f"the 7B streaming figures are upper estimates. A slope at or below zero (streaming: memory does not grow "
           f"with layers) is reported as flat, the {wide[-1]}-layer value. Times are not extrapolated (one layer "
           f"changes them by less than the noise; they would be treated as flat likewise).")
    report.write("export_memory", data | {"depth_slope": slope, "extrapolated_7b": extrapolated},
                 doc + "\n\n" + table(results, extrapolated, checkpoints))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", default="/tmp/pure-lite-export-bench")
    parser.add_argument("--wide-layers", default="2,3", help="layer counts of the 7B-width checkpoints")
    parser.add_argument("--quants", default=",".join(QUANTS))
    parser.add_argument("--repeats", type=int, default=3, help="runs of each streaming export (median)")
    parser.add_argument("--report-only", action="store_true",
                        help="rewrite the table from benchmarks/results/export_memory.json without measuring")
    args = parser.parse_args()
    if args.report_only:
        data = json.loads((report.ROOT / "benchmarks" / "results" / "export_memory.json").read_text())
        return render(data, data.get("repeats", args.repeats))
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    checkpoints = make_checkpoints(work, [int(n) for n in args.wide_layers.split(",")])
    results: dict = {}
    for name, ckpt in checkpoints.items():
        if name.startswith("narrow"):
            continue
        for quant in args.quants.split(","):
            for path in PATHS:  # side by side: the two paths of one export back to back
                r = run_export(work, path, ckpt, quant, args.repeats if path == "streaming" else 1)
                results.setdefault(name, {}).setdefault(quant, {})[path] = r
                print(name, quant, path, {k: v for k, v in r.items() if k != "runs"}, flush=True)
    depth = {n: run_export(work, "streaming", checkpoints[f"narrow, {n} layers"], "int4", 1) for n in DEPTH_LAYERS}
    sizes = {name: {"gb": folder_gb(path), "path": str(path)} for name, path in checkpoints.items()}
    render({"results": results, "depth": depth, "checkpoints": sizes, "repeats": args.repeats}, args.repeats)


if __name__ == "__main__":
    main()
