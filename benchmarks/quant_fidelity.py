"""Fidelity of each weight format against float, on one checkpoint, in one run:
file size, top-1 agreement and max logit error over a fixed prompt (teacher-forced, so every mode
sees the same tokens), and PSNR of a greedy restoration's image against float's.

Modes: float / int8 / int4 (ONNX exports, runtime) and nf4 (bitsandbytes, torch backend).

    python benchmarks/quant_fidelity.py [--workdir /tmp/pure-lite-bench] [--size 128]

Reuses the checkpoint and exports that end_to_end.py leaves in --workdir.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

import report


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return float("inf") if mse == 0 else 10 * np.log10(255.0**2 / mse)


def teacher_forced_logits(decoder, prompt: np.ndarray, forced: np.ndarray) -> np.ndarray:
    """Logits after the prompt and after each forced token (conditional branch only)."""
    out = [decoder.prefill(prompt, capacity=len(prompt) + len(forced) + 1)[0].copy()]
    for tok in forced:
        out.append(decoder.step(np.array([tok], dtype=np.int64))[0].copy())
    return np.stack(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", default="/tmp/pure-lite-bench")
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--steps", type=int, default=64)
    args = parser.parse_args()

    from pure_lite import Restorer, SamplingConfig
    from end_to_end import folder_mb, test_image

    work = Path(args.workdir)
    ckpt = work / "checkpoint"
    modes = {"float": work / "onnx-float", "int8": work / "onnx-int8", "int4": work / "onnx-int4", "nf4": ckpt}
    restorers = {m: Restorer.from_pretrained(p, quantization="nf4" if m == "nf4" else None) for m, p in modes.items()}
    layout = restorers["float"].components.layout
    rng = np.random.default_rng(0)
    lq = layout.encode_image(rng.integers(0, layout.codebook_size, (16, 16)))
    from pure_lite.prompt import prompt_ids

    prompt = prompt_ids(restorers["float"].components.tokenizer, layout, lq)
    forced = layout.image_ids[rng.integers(0, layout.codebook_size, args.steps)]
    greedy = SamplingConfig(temperature=0.0, max_text_tokens=8)
    logits, pictures = {}, {}
    for mode, r in restorers.items():
        logits[mode] = teacher_forced_logits(r.components.new_decoder(), prompt, forced)
        pictures[mode] = np.asarray(r.restore(test_image(args.size // 4), sampling=greedy, target_size=args.size).image)
    ref = logits["float"]
    results = {"checkpoint": str(ckpt), "steps": args.steps, "size": args.size, "modes": {}}
    rows = ["| mode | model on disk (MB) | top-1 agreement | max logit error (float-logit std) | image PSNR vs float (dB) |",
            "| --- | --- | --- | --- | --- |"]
    for mode in modes:
        top1 = float((logits[mode].argmax(-1) == ref.argmax(-1)).mean())
        err = float(np.abs(logits[mode] - ref).max() / ref.std())
        p = psnr(pictures[mode], pictures["float"])
        size = folder_mb(modes[mode])
        results["modes"][mode] = {"model_mb": size, "top1": top1, "max_logit_err_std": err, "psnr_db": p}
        rows.append(f"| {mode}{' (bitsandbytes, torch)' if mode == 'nf4' else ''} | {size:.0f} | {top1:.3f} | {err:.3f} | "
                    f"{'identical' if p == float('inf') else f'{p:.1f}'} |")
    table = (f"Random-weight checkpoint in `{work.name}` (see end_to_end), prompt of {len(prompt)} tokens then "
             f"{args.steps} teacher-forced image tokens; greedy {args.size}x{args.size} restoration for PSNR. "
             "nf4 keeps its checkpoint folder (bitsandbytes quantizes at load time).\n\n" + "\n".join(rows))
    report.write("quant_fidelity", results, table)


if __name__ == "__main__":
    main()
