"""End to end on a mid-size random Chameleon (default: hidden 1024, 8 layers, vocabulary 73728, 254M
parameters; 256x256 output), every variant measured in one run, each in its own process (peak RSS):

- reference: the reference's loop: transformers model with a dynamic cache, the unconditional branch
  as a second batch-1 forward every step, every token of the image block its own step, and the
  torch logits-processor chain of benchmarks/sampler.py
- torch: pure-lite's torch backend (CFG as batch 2, forced tokens folded, NumPy sampler)
- onnx-float / onnx-int8 / onnx-int4: pure-lite's runtime on ONNX Runtime (CPU)

    python benchmarks/end_to_end.py [--size 256] [--workdir /tmp/pure-lite-bench]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import report

VARIANTS = ["reference", "torch", "onnx-float", "onnx-int8", "onnx-int4"]


def peak_rss_mb() -> float:
    """This process's high-water RSS. (ru_maxrss would carry over the parent's across exec.)"""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def folder_mb(path: Path) -> float:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) / 1e6


def test_image(size: int) -> np.ndarray:
    y, x = np.mgrid[0:size, 0:size] / size
    return (np.stack([x, y, 1 - x * y], axis=2) * 255).astype(np.uint8)


def run_reference(ckpt: Path, size: int, text_tokens: int) -> dict:
    """The reference-style loop (see module docstring); returns timings."""
    import torch
    from sampler import reference_step
    from transformers import DynamicCache

    from pure_lite import images
    from pure_lite.checkpoint import CheckpointFiles
    from pure_lite.prompt import TextTokenizer, prompt_ids
    from pure_lite.sampling import SamplingConfig
    from pure_lite.tokens import TokenLayout
    from pure_lite.torch_backend.chameleon import load_language_model
    from pure_lite.torch_backend.load import load_vq

    files = CheckpointFiles.locate(ckpt)
    layout = TokenLayout.from_tokenizer_file(files.tokenizer, files.read_config()["vocab_size"])
    lm = load_language_model(files, attn_implementation="sdpa")
    vq = load_vq(files)
    cfg = SamplingConfig()
    t0 = time.perf_counter()
    lq = images.resize(images.load_image(test_image(size // 4)), size)
    codes = vq.encode(torch.from_numpy(images.to_model_input(lq)))[0].numpy()
    prompt = prompt_ids(TextTokenizer(files.tokenizer), layout, layout.encode_image(codes))
    image_ids = torch.from_numpy(np.array(layout.image_ids))
    gen = torch.Generator().manual_seed(0)

    @torch.inference_mode()
    def forward(ids, cache):
        hidden = lm.model(input_ids=torch.tensor([ids]), cache=cache, use_cache=True).last_hidden_state
        return lm.lm_head(hidden[:, -1]).float()

    cond_cache, uncond_cache = DynamicCache(config=lm.config), DynamicCache(config=lm.config)
    logits = forward(list(prompt), cond_cache)
    for _ in range(text_tokens):  # greedy text, one forward each
        logits = forward([int(logits.argmax())], cond_cache)
    t_image = time.perf_counter()
    h = w = size // 8
    block = layout.header(size, size).tolist()
    out_codes = []
    uncond = None
    # every block token is its own step; grid tokens, row ends and <eoss> too
    for tok in block:
        logits = forward([tok], cond_cache)
        uncond = forward([tok], uncond_cache)
    for r in range(h):
        for c in range(w):
            tok = int(reference_step(torch, logits, uncond, image_ids, cfg, gen))
            out_codes.append(int(layout.code_of[tok]))
            logits, uncond = forward([tok], cond_cache), forward([tok], uncond_cache)
        logits, uncond = forward([layout.row_end], cond_cache), forward([layout.row_end], uncond_cache)
    image_s = time.perf_counter() - t_image
    pixels = vq.decode(torch.tensor(out_codes).reshape(1, h, w)).numpy()
    images.color_fix(images.from_model_output(pixels), lq)
    total = time.perf_counter() - t0
    return {"seconds_per_image": total, "image_s": image_s, "image_steps_per_s": h * w / image_s}


def run_pure_lite(model: Path, size: int, text_tokens: int) -> dict:
    from pure_lite import Restorer, SamplingConfig

    restorer = Restorer.from_pretrained(model)
    run_s = [0.0]
    decoder_factory = restorer.components.new_decoder
    if restorer.components.description.startswith("onnxruntime"):
        def instrumented():
            dec = decoder_factory()

            class Timed:
                """Wraps a session to add up the seconds spent inside run_with_iobinding."""

                def __init__(self, session):
                    self.session = session

                def __getattr__(self, name):
                    return getattr(self.session, name)

                def run_with_iobinding(self, binding):
                    t = time.perf_counter()
                    self.session.run_with_iobinding(binding)
                    run_s[0] += time.perf_counter() - t

            dec.session = Timed(dec.session)
            dec.text_head = (Timed(dec.text_head[0]),) + dec.text_head[1:]
            dec.image_head = (Timed(dec.image_head[0]),) + dec.image_head[1:]
            return dec

        object.__setattr__(restorer.components, "new_decoder", instrumented)
    sampling = SamplingConfig(max_text_tokens=text_tokens)
    t0 = time.perf_counter()
    res = restorer.restore(test_image(size // 4), seed=0, sampling=sampling, target_size=size)
    out = {"seconds_per_image": time.perf_counter() - t0, "image_s": res.timings["image_s"],
           "image_steps_per_s": res.timings["image_steps_per_s"], "text_tokens": int(len(res.tokens) - (size // 8) * (size // 8 + 1) - 5)}
    if run_s[0]:
        total = res.timings["prefill_s"] + res.timings["text_s"] + res.timings["image_s"]
        out["outside_session_run_fraction"] = 1 - run_s[0] / total
    return out


def child(args) -> None:
    model = Path(args.model)
    fn = run_reference if args.run == "reference" else run_pure_lite
    result = fn(model, args.size, args.text_tokens)
    result["peak_rss_mb"] = peak_rss_mb()
    print("RESULT " + json.dumps(result))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--intermediate", type=int, default=2816)
    parser.add_argument("--vq-width", type=int, default=32, help="VQ base channels (release: 128)")
    parser.add_argument("--text-tokens", type=int, default=16)
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--workdir", default="/tmp/pure-lite-bench")
    parser.add_argument("--run", help=argparse.SUPPRESS)
    parser.add_argument("--model", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.run:
        return child(args)

    from pure_lite.export import export_onnx

    from pure_lite.testing import make_tiny_checkpoint

    work = Path(args.workdir)
    ckpt = work / "checkpoint"
    if not (ckpt / "config.json").exists():
        make_tiny_checkpoint(ckpt, seed=0, layout="pure", hidden_size=args.hidden, num_layers=args.layers,
                             num_heads=args.heads, intermediate_size=args.intermediate, init_std=0.02,
                             vq_base_channels=args.vq_width, max_position_embeddings=8192)
    models = {"reference": ckpt, "torch": ckpt}
    export_s = {}
    for quant in ("float", "int8", "int4"):
        out = work / f"onnx-{quant}"
        if f"onnx-{quant}" in args.variants and not (out / "pure_lite_manifest.json").exists():
            t = time.perf_counter()
            export_onnx(ckpt, out, quantization=None if quant == "float" else quant, overwrite=True)
            export_s[f"onnx-{quant}"] = time.perf_counter() - t
        models[f"onnx-{quant}"] = out
    results = {"config": vars(args) | {"params_m": None}, "export_s": export_s, "variants": {}}
    for name in args.variants.split(","):
        cmd = [sys.executable, __file__, "--run", name, "--model", str(models[name]), "--size", str(args.size),
               "--text-tokens", str(args.text_tokens)]
        proc = subprocess.run(cmd, capture_output=True, text=True, cwd=Path(__file__).parent)
        line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
        if proc.returncode or not line:
            raise SystemExit(f"{name} failed:\n{proc.stderr[-3000:]}")
        r = json.loads(line[0][7:])
        r["model_mb"] = folder_mb(models[name])
        results["variants"][name] = r
        print(name, r, flush=True)
    ref = results["variants"].get("reference", {}).get("seconds_per_image")
    rows = ["| variant | s / image | image steps / s | speed-up vs reference | peak RSS (MB) | model on disk (MB) | outside `session.run` |",
            "| --- | --- | --- | --- | --- | --- | --- |"]
    for name, r in results["variants"].items():
        speed = f"{ref / r['seconds_per_image']:.2f}x" if ref else "-"
        outside = f"{100 * r['outside_session_run_fraction']:.1f}%" if "outside_session_run_fraction" in r else "-"
        rows.append(f"| {name} | {r['seconds_per_image']:.1f} | {r['image_steps_per_s']:.1f} | {speed} | "
                    f"{r['peak_rss_mb']:.0f} | {r['model_mb']:.0f} | {outside} |")
    table = (f"Mid-size random Chameleon: hidden {args.hidden}, {args.layers} layers, vocabulary 73728, "
             f"{args.size}x{args.size} output ({(args.size // 8) ** 2} image codes), {args.text_tokens} text tokens, "
             f"VQ width {args.vq_width}, CFG 0.8, one image per variant.\n\n" + "\n".join(rows))
    report.write("end_to_end", results, table)


if __name__ == "__main__":
    main()
