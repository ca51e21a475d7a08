"""The ``pure-lite`` command. Argument parsing lives here only; defaults come from the config dataclasses."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .errors import PureLiteError
from .export.quantize import QuantizationConfig
from .sampling import SamplingConfig

_DEFAULTS = SamplingConfig()
QuantizationDefaults = QuantizationConfig()


def _outputs(inputs: list[Path], output: Path) -> list[Path]:
    """One output per input: ``output`` itself for a single input with an image suffix, else OUTPUT/<stem>_restored.png."""
    if len(inputs) == 1 and output.suffix and not output.is_dir():
        return [output]
    return [output / f"{p.stem}_restored.png" for p in inputs]


def _restore(args: argparse.Namespace) -> int:
    from . import images
    from .restorer import Restorer

    sampling = SamplingConfig(
        temperature=args.temperature, cfg_scale=args.cfg, text_top_k=_DEFAULTS.text_top_k,
        k_min=_DEFAULTS.k_min, k_max=_DEFAULTS.k_max, max_new_tokens=args.max_new_tokens,
        max_text_tokens=args.max_text_tokens,
    )
    inputs = [Path(p) for p in args.inputs]
    outputs = _outputs(inputs, Path(args.output))
    input_set = {p.resolve() for p in inputs if p.exists()}
    try:
        restorer = Restorer.from_pretrained(args.model, device=args.device)
    except PureLiteError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    failures = 0
    for src, dst in zip(inputs, outputs):
        try:
            if dst.resolve() in input_set:
                raise PureLiteError(f"output {dst} is one of the inputs; refusing to overwrite it")
            result = restorer.restore(
                src, seed=args.seed, sampling=sampling, target_size=args.target_size,
                color_fix=not args.no_color_fix, progress=not args.quiet,
            )
            images.save_image_atomic(result.image, dst)
        except PureLiteError as exc:
            failures += 1
            message = str(exc) if str(src) in str(exc) else f"{src}: {exc}"
            print(f"error: {message}", file=sys.stderr)
            continue
        print(f"{src} -> {dst}")
        print(f"  text: {result.text!r}")
    return 1 if failures else 0


def _export(args: argparse.Namespace) -> int:
    from .export import build_tensorrt, export_onnx
    from .manifest import MANIFEST_FILE

    quant = None if args.quant == "none" else args.quant
    source, out = Path(args.model_dir), Path(args.output)
    if args.format == "onnx":
        export_onnx(source, out, quantization=quant, block_size=args.block_size, overwrite=args.overwrite)
        return 0
    if quant is not None:
        raise PureLiteError("TensorRT engines are built from the float export: use --quant none with --format tensorrt")
    if not (source / MANIFEST_FILE).is_file():
        source = export_onnx(source, out / "onnx", block_size=args.block_size, overwrite=args.overwrite)
        out = out / "tensorrt"
    build_tensorrt(source, out)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pure-lite", description="PURE real-world image super-resolution")
    sub = parser.add_subparsers(dest="command", required=True)

    r = sub.add_parser("restore", help="restore one or more images")
    r.add_argument("inputs", nargs="+", metavar="INPUT", help="image files")
    r.add_argument("-o", "--output", required=True,
                   help="output file (one input) or folder (several); never one of the inputs")
    r.add_argument("--model", required=True, help="PURE checkpoint folder")
    r.add_argument("--device", default="cpu", help="torch device (default: cpu)")
    r.add_argument("--seed", type=int, default=None, help="random seed for reproducible sampling")
    r.add_argument("--temperature", type=float, default=_DEFAULTS.temperature,
                   help=f"sampling temperature, 0 = greedy (default: {_DEFAULTS.temperature})")
    r.add_argument("--cfg", type=float, default=_DEFAULTS.cfg_scale,
                   help=f"classifier-free guidance scale, 1 = off (default: {_DEFAULTS.cfg_scale})")
    r.add_argument("--target-size", type=int, default=512, help="output side in pixels (default: 512)")
    r.add_argument("--max-text-tokens", type=int, default=_DEFAULTS.max_text_tokens,
                   help=f"text tokens allowed before the image starts (default: {_DEFAULTS.max_text_tokens})")
    r.add_argument("--max-new-tokens", type=int, default=_DEFAULTS.max_new_tokens,
                   help=f"limit on generated tokens (default: {_DEFAULTS.max_new_tokens})")
    r.add_argument("--no-color-fix", action="store_true", help="skip the wavelet colour fix")
    r.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    r.set_defaults(func=_restore)

    e = sub.add_parser("export", help="export a checkpoint to ONNX (float/int8/int4) or TensorRT engines")
    e.add_argument("model_dir", metavar="MODEL_DIR", help="PURE checkpoint folder (or, for tensorrt, an ONNX export)")
    e.add_argument("-o", "--output", required=True, help="output folder (created; must be empty)")
    e.add_argument("--quant", choices=["none", "int8", "int4"], default="none",
                   help="weight-only quantization of the decoder (default: none)")
    e.add_argument("--format", choices=["onnx", "tensorrt"], default="onnx", help="output format (default: onnx)")
    e.add_argument("--block-size", type=int, default=QuantizationDefaults.block_size,
                   help=f"quantization block size (default: {QuantizationDefaults.block_size})")
    e.add_argument("--overwrite", action="store_true", help="replace a non-empty output folder")
    e.set_defaults(func=_export)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (PureLiteError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
