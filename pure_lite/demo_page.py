"""The page of ``pure-lite demo`` (Gradio): its layout and handlers around one loaded Restorer.

PURE's difference from a plain upscaler is invisible on the command line: it writes what it
perceived (degradation levels, a description) and samples each region with an entropy-chosen
top-k. The page shows both beside a before/after comparison, and serves the same restoration as
an API (``gradio_client``, endpoint ``/restore``).

Restorations run one at a time, behind a lock around the one ``Restorer`` (its decoder holds one
KV cache), and Gradio's queue keeps the others waiting. A cancelled or failed request is reported
on the page and the server goes on serving. Imported only through pure_lite.demo, after it has
pointed Gradio at its temporary folder.
"""

from __future__ import annotations

import re
import shutil
import tempfile
import threading
import time
import traceback
from pathlib import Path
from typing import Callable

import gradio as gr
import numpy as np
from PIL import Image

from . import images
from .errors import GenerationCancelled, InvalidImageError, PureLiteError
from .restorer import Restoration, Restorer
from .sampling import SamplingConfig
from .tiles import DEFAULT_TILE_BATCH

# the README's example photo; present in a checkout (an editable install), not in a wheel
EXAMPLE = Path(__file__).parents[1] / "examples" / "images" / "photo.png"
MAX_UPLOAD = "50mb"  # Gradio refuses larger uploads before they reach the model
CANCEL_WAIT_S = 30  # a decoding step polls the cancel flag; the text stage every 16 tokens
OUTPUT_MAX_AGE_S = 3600  # restored PNGs older than this are deleted (a long-running server does not fill its disk)
MODES = [("scale × the photo", "scale"), ("one square of target size (PURE's own mode)", "target_size")]
_DEFAULTS = SamplingConfig()
# anchors of a dark-to-bright heat scale (position, RGB) for the entropy map
_HEAT = ((0.0, (0, 0, 4)), (0.25, (80, 18, 123)), (0.5, (183, 55, 121)), (0.75, (252, 137, 97)),
         (1.0, (252, 253, 191)))


def model_line(model: str | None, restorer: Restorer) -> str:
    """Which model answers; for the shipped PURE-tiny, that it is a demonstration and where the real one is."""
    c = restorer.components
    tiles = f"{c.image_size}×{c.image_size} tiles; {c.description}"
    if model is None:
        return ("**Model: PURE-tiny**, a small demonstration model shipped with pure-lite "
                f"({tiles}), far below PURE's quality (docs/pure-tiny.md). The real model is PURE's 7B "
                "checkpoint, `nonwhy/PURE` on Hugging Face, with LlamaGen's `vq_ds8_c2i.pt` (README, "
                "*The real PURE*): `pure-lite demo --model /path/to/PURE`.")
    return f"**Model:** `{model}` ({tiles})"


def heat_map(entropy: np.ndarray, output: Image.Image) -> Image.Image:
    """The sampler's entropy (one value per 8x8 output pixels) as a heat scale laid over the greyed output,
    dark where the model was sure (smooth areas, few candidate codes), bright in texture."""
    lo, hi = float(entropy.min()), float(entropy.max())
    t = (entropy - lo) / max(hi - lo, 1e-6)
    at = [p for p, _ in _HEAT]
    rgb = np.stack([np.interp(t, at, [c[k] for _, c in _HEAT]) for k in range(3)], axis=-1).astype(np.uint8)
    rows, cols = entropy.shape
    heat = Image.fromarray(rgb, mode="RGB").resize((cols * 8, rows * 8), Image.NEAREST).crop((0, 0, *output.size))
    return Image.blend(output.convert("L").convert("RGB"), heat, 0.65)


def _escape(text: str) -> str:
    """Model text shown as Markdown literally (it may hold any characters)."""
    return re.sub(r"([\\`*_\[\]<>#|~])", r"\\\1", text)


def model_text(result: Restoration) -> str:
    """What the model wrote: once when every tile agrees, else per group of tiles that wrote the same."""
    groups: dict[tuple[str | None, str | None, str], list[int]] = {}
    for number, tile in enumerate(result.tiles, 1):
        raw = tile.text if tile.degradation is None and tile.description is None else ""
        groups.setdefault((tile.degradation, tile.description, raw), []).append(number)

    def said(degradation: str | None, description: str | None, raw: str) -> str:
        parts = [f"**{label}:** {_escape(value)}" for label, value in
                 (("Degradation", degradation), ("Description", description)) if value]
        return "  \n".join(parts) or f"(no degradation or description; raw text: {_escape(raw) or 'none'})"

    if len(groups) == 1:
        (key, numbers), = groups.items()
        every = f"all {len(numbers)} tiles" if len(numbers) > 1 else "one tile"
        return f"### What the model wrote ({every})\n\n{said(*key)}"
    lines = [f"### What the model wrote (the {len(result.tiles)} tiles differ)"]
    for key, numbers in groups.items():
        lines.append(f"- tile{'s' if len(numbers) > 1 else ''} {', '.join(map(str, numbers))}:  \n  "
                     + said(*key).replace("  \n", "  \n  "))
    return "\n".join(lines)


def timing_text(result: Restoration, waited_s: float, total_s: float) -> str:
    t = result.timings
    stages = " · ".join(f"{name} {t[key]:.1f} s" for name, key in (
        ("encode", "encode_s"), ("prefill", "prefill_s"), ("text", "text_s"), ("image codes", "image_s"),
        ("VQ decode", "decode_image_s")) if key in t)
    return (f"### Timings\n\n{int(t['tiles'])} tile(s) in {total_s:.1f} s (waited {waited_s:.1f} s for the model): "
            f"{stages}  \n{t['image_steps_per_s']:.1f} image codes per second, {int(t['decoder_calls'])} decoder "
            f"calls, {t['accepted_per_call']:.2f} codes per call per tile  \nsampler entropy "
            f"{result.entropy.min():.1f} (dark) to {result.entropy.max():.1f} (bright) nats per code")


def _eta(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 90 else f"{seconds / 60:.0f} min"


def progress_reporter(progress: Callable[..., object], every_s: float = 0.25) -> Callable[[float, int], None]:
    """``Restorer.restore``'s ``progress`` drawn as Gradio's bar: tiles done and the time left, estimated
    from the decoding rate since the first report (the encoding and text stages before it would skew it)."""
    first: list[float] = []
    last = [0.0]

    def report(done: float, total: int) -> None:
        now = time.perf_counter()
        if not first and done > 0:  # (0, total) comes before the text stage: the rate starts with the codes
            first[:] = [now, done]
        if now - last[0] < every_s and done < total:
            return
        last[0] = now
        desc = f"tile {min(int(done) + 1, total)} of {total}"
        if first and done > first[1] and now > first[0]:
            desc += f", about {_eta((now - first[0]) / (done - first[1]) * (total - done))} left"
        progress(done / total, desc=desc)

    return report


class DemoServer:
    """The page's handlers around one loaded Restorer: one restoration at a time, cancellable per browser session."""

    def __init__(self, restorer: Restorer, model: str | None, output_root: Path):
        self.restorer = restorer
        self.model = model
        self.output_root = output_root
        self._lock = threading.Lock()  # the Restorer holds one decoder: never two restorations at once
        self._running: dict[str, threading.Event] = {}  # session -> its restoration's cancel flag

    def check(self, photo: str | None) -> str:
        """On upload: the photo's size, or why it cannot be restored (read from the header; nothing decoded)."""
        if photo is None:
            return ""
        path = Path(photo)
        try:
            _check_not_empty(path)
            width, height = images.image_size(path)  # a non-image fails here, from its header
        except (PureLiteError, OSError) as exc:
            return f"**error:** {_escape(_message(exc, path))}"
        return f"{_escape(path.name)}: {width}×{height} pixels"

    def restore(self, photo: str | None, mode: str, scale: float, target_size: float, seed: float,
                temperature: float, cfg: float, jacobi_window: float, tile_batch: float,
                request: gr.Request, progress=gr.Progress()):
        """Restore the uploaded photo; returns the comparison, the PNG's path, the entropy map and three texts."""
        if not photo:
            raise gr.Error("No photo: upload one (or pick the example) first.", duration=None)
        path = Path(photo)
        session = request.session_hash or ""
        cancel = threading.Event()
        self._running[session] = cancel
        queued = time.perf_counter()
        try:
            sampling = SamplingConfig(temperature=float(temperature), cfg_scale=float(cfg),
                                      jacobi_window=int(jacobi_window))
            size = {"target_size": int(target_size)} if mode == "target_size" else {"scale": float(scale)}
            _check_not_empty(path)
            progress(0, desc="waiting for the model")
            with self._lock:
                started = time.perf_counter()
                progress(0, desc="reading the photo, writing what it sees")
                result = self.restorer.restore(path, seed=int(seed), sampling=sampling, tile_batch=int(tile_batch),
                                               cancel=cancel.is_set, progress=progress_reporter(progress), **size)
                total = time.perf_counter() - started
            out = self._write(result.image, path)
            before = images.to_pil(images.load_image(path)).resize(result.image.size, Image.NEAREST)
        except GenerationCancelled:
            raise gr.Error("Cancelled; the server is ready for the next photo.", duration=None) from None
        except (PureLiteError, ValueError, OSError) as exc:
            raise gr.Error(_message(exc, path), duration=None) from None
        except Exception as exc:  # a bug must not stop the server: report it on the page and in its log
            traceback.print_exc()
            raise gr.Error(f"{type(exc).__name__}: {_message(exc, path)}", duration=None) from None
        finally:
            if self._running.get(session) is cancel:
                del self._running[session]
        width, height = before.size
        status = (f"Restored {_escape(path.name)} to {width}×{height} in {len(result.tiles)} tile(s), seed {int(seed)}; "
                  "the comparison shows the input enlarged with nearest-neighbour pixels.")
        return ((before, result.image), str(out), heat_map(result.entropy, result.image), model_text(result),
                timing_text(result, started - queued, total), status)

    def cancel(self, request: gr.Request) -> str:
        """Stop this browser's restoration at its next decoding step and wait for it to stop (a queued one
        Gradio drops itself)."""
        session = request.session_hash or ""
        flag = self._running.get(session)
        if flag is None:
            return "Nothing to cancel."
        flag.set()
        deadline = time.monotonic() + CANCEL_WAIT_S
        while self._running.get(session) is flag and time.monotonic() < deadline:
            time.sleep(0.05)
        return "Cancelled." if self._running.get(session) is not flag else "Cancelling..."

    def _write(self, image: Image.Image, source: Path) -> Path:
        """The full-resolution PNG in a folder of its own (names never collide); old ones are deleted."""
        self.output_root.mkdir(exist_ok=True)
        now = time.time()
        for old in self.output_root.iterdir():
            if now - old.stat().st_mtime > OUTPUT_MAX_AGE_S:
                shutil.rmtree(old, ignore_errors=True)
        out = Path(tempfile.mkdtemp(dir=self.output_root)) / f"{source.stem}_restored.png"
        images.save_image_atomic(image, out, overwrite=False)
        return out


def _check_not_empty(path: Path) -> None:
    if path.stat().st_size == 0:
        raise InvalidImageError(f"{path.name} is empty (0 bytes): upload the photo again")


def _message(exc: BaseException, path: Path) -> str:
    """The error's message naming the upload by its file name, not by its temporary path."""
    return (str(exc) or type(exc).__name__).replace(str(path), path.name)


def build_page(server: DemoServer) -> gr.Blocks:
    c = server.restorer.components
    with gr.Blocks(title="pure-lite demo", analytics_enabled=False,
                   delete_cache=(OUTPUT_MAX_AGE_S, OUTPUT_MAX_AGE_S)) as page:
        gr.Markdown("## pure-lite: restore a photo with PURE")
        gr.Markdown(model_line(server.model, server.restorer), elem_id="model")
        with gr.Row():
            with gr.Column(scale=1, min_width=300):
                photo = gr.File(label="Photo", file_types=["image"], type="filepath", elem_id="photo")
                if EXAMPLE.is_file():
                    gr.Examples([[str(EXAMPLE)]], inputs=[photo], label="Example (96×64)")
                status = gr.Markdown(elem_id="status")
                mode = gr.Radio(MODES, value="scale", label="Output size")
                scale = gr.Slider(1, 8, value=4, step=0.5, label="Scale", elem_id="scale")
                target_size = gr.Number(c.image_size, precision=0, step=32, minimum=32,
                                        label="Target size (a multiple of 32)")
                with gr.Row():
                    seed = gr.Number(0, precision=0, label="Seed")
                    tile_batch = gr.Number(DEFAULT_TILE_BATCH, precision=0, minimum=1, label="Tile batch")
                temperature = gr.Slider(0, 2, value=_DEFAULTS.temperature, step=0.05, label="Temperature (0 = greedy)")
                cfg = gr.Slider(0, 4, value=_DEFAULTS.cfg_scale, step=0.05, label="CFG (1 = off)")
                jacobi = gr.Slider(0, 16, value=_DEFAULTS.jacobi_window, step=1,
                                   label="Jacobi window (0 = plain decoding)")
                with gr.Row():
                    restore_button = gr.Button("Restore", variant="primary", elem_id="restore")
                    cancel_button = gr.Button("Cancel", variant="stop", elem_id="cancel")
            with gr.Column(scale=2):
                comparison = gr.ImageSlider(label="Before (input, enlarged) / after (restored)", type="pil",
                                            format="png", elem_id="comparison")
                with gr.Row():
                    entropy = gr.Image(label="Sampler entropy: dark = sure, bright = texture", type="pil",
                                       format="png", interactive=False, elem_id="entropy")
                    download = gr.File(label="Restored PNG (full resolution)", elem_id="download")
                text = gr.Markdown(elem_id="model-text")
                timings = gr.Markdown(elem_id="timings")
        photo.change(server.check, inputs=[photo], outputs=[status], api_visibility="private")
        event = restore_button.click(
            server.restore, inputs=[photo, mode, scale, target_size, seed, temperature, cfg, jacobi, tile_batch],
            outputs=[comparison, download, entropy, text, timings, status], api_name="restore",
            concurrency_limit=1, concurrency_id="model", show_progress_on=[comparison])
        cancel_button.click(server.cancel, outputs=[status], cancels=[event], queue=False, api_visibility="private")
    return page


def launch(restorer: Restorer, model: str | None, root: Path, *, host: str, port: int, share: bool) -> None:
    """Serve the page until interrupted; ``root`` is the temporary folder Gradio was told to use."""
    page = build_page(DemoServer(restorer, model, root / "outputs"))
    page.queue(default_concurrency_limit=1)
    system = ["ui-sans-serif", "system-ui", "sans-serif"]  # no web fonts: the page needs nothing from outside
    page.launch(server_name=host, server_port=port, share=share, max_file_size=MAX_UPLOAD,
                allowed_paths=[str(EXAMPLE)] if EXAMPLE.is_file() else None,
                theme=gr.themes.Default(font=system, font_mono=["ui-monospace", "monospace"]))
