"""``restore_many``: restore a folder of images on this machine or a Ray cluster, resumable, nothing lost.

Steps of a run (docs/scale.md):
 1. find the images under INPUT_DIR, hash each one's content, and plan against OUTPUT_DIR's
    journal (pure_lite/journal.py): what is done stays done, what failed stays failed unless
    ``retry_failed``, everything else is pending
 2. only when something is pending: connect to Ray and start the workers, Ray actors that each
    load one ``Restorer`` once and restore many images
 3. send each pending image's bytes to a free worker; write the returned PNG atomically into
    OUTPUT_DIR and record the outcome in the journal; an image whose worker died goes back in
    the queue for another worker, and a replacement worker is started
 4. write the JSON report and return it

Why an actor pool and not Ray Data's ``map_batches``: the run must record each image's outcome the
moment it is known (the journal is the resume point after a kill or Ctrl-C), retry exactly the
image a dead worker held, and tell one unreadable image apart from a dead worker. With our own
dispatch over actors, each image is one actor call whose result or failure reaches this process
on its own; Ray Data's unit of work and retry is a block of rows, its results stream back in
blocks, and it needs pyarrow. Ray core is all this module needs (the ``[ray]`` extra).

The driver (this process) reads every input and writes every output and the journal: workers get
an image's bytes and return PNG bytes, so a cluster's nodes need the model and pure-lite
installed but no access to INPUT_DIR or OUTPUT_DIR. Nothing else in pure-lite imports Ray.
"""

from __future__ import annotations

import errno
import hashlib
import inspect
import io
import json
import os
import time
from collections import deque
from dataclasses import dataclass, fields, is_dataclass, replace
from pathlib import Path
from typing import Any, Callable, Mapping

from .errors import InvalidImageError, MissingDependencyError, OutputError, PureLiteError
from .journal import Entry, Journal, output_name
from .regular_files import open_regular, read_regular, regular_file_problem

REPORT_FILE = "restore-many-report.json"
BASE_SEED = 0  # default base seed: outputs are reproducible unless another one is asked for
PROVENANCE_KEY = "pure-lite"  # PNG text chunk: which input content and settings made this output
_NOT_OPTIONS = {"self", "image", "seed", "progress", "cancel"}  # restore() arguments that restore_many sets itself


@dataclass(frozen=True)
class BatchConfig:
    """How a run is spread over workers. None of this changes an output, so none of it is in the journal's settings."""

    workers: int | None = None  # None: one per GPU share (gpus_per_worker), or 1 on a cluster without GPUs
    gpus_per_worker: float | None = None  # None: 1 when the cluster has GPUs, else 0 (CPU)
    cpus_per_worker: float = 1.0  # Ray's CPU reservation per worker: place at most CPUs / this per node
    # Where to run: "auto" (a cluster started on this node with `ray start`) or "ray://HOST:10001"; None: a new
    # local Ray sized to this machine. A process already connected to Ray (ray.init) keeps that one either way.
    address: str | None = None
    retry_failed: bool = False  # restore inputs the journal records as failed again
    max_attempts: int = 3  # workers that may die holding one image before it is recorded as failed

    def __post_init__(self):
        if self.workers is not None and self.workers < 1:
            raise ValueError(f"workers must be at least 1, got {self.workers}")
        if self.gpus_per_worker is not None and self.gpus_per_worker < 0:
            raise ValueError(f"gpus_per_worker must be >= 0, got {self.gpus_per_worker}")
        if self.cpus_per_worker <= 0:
            raise ValueError(f"cpus_per_worker must be > 0, got {self.cpus_per_worker}")
        if self.max_attempts < 1:
            raise ValueError(f"max_attempts must be at least 1, got {self.max_attempts}")


@dataclass(frozen=True)
class WorkerInfo:
    pid: int  # the worker's process id on its node
    node: str  # the node's IP address


@dataclass(frozen=True)
class BatchReport:
    """The outcome of ``restore_many``: every input's journal entry and the run's totals."""

    entries: list[Entry]  # one per input found in INPUT_DIR, in name order
    restored: int  # images restored by this run (not counting those done by earlier runs)
    seconds: float  # wall time of this run
    report_path: Path

    def count(self, status: str) -> int:
        return sum(e.status == status for e in self.entries)

    @property
    def images_per_minute(self) -> float:
        return 60.0 * self.restored / self.seconds if self.seconds > 0 else 0.0

    def summary(self) -> str:
        before = self.count("done") - self.restored
        return (f"restore-many: {self.count('done')} done ({before} by earlier runs), {self.count('failed')} failed, "
                f"{self.count('pending')} pending; restored {self.restored} in {self.seconds:.1f} s "
                f"({self.images_per_minute:.1f} images/min); report: {self.report_path}")


def image_seed(base_seed: int, name: str) -> int:
    """The seed of one image: a stable hash of the base seed and its relative name, so that an output does
    not depend on which worker made it or in which order (Python's ``hash`` changes per process)."""
    digest = hashlib.sha256(f"{base_seed}\0{name}".encode()).digest()
    return int.from_bytes(digest[:8], "little")


def find_images(input_dir: Path, skip: Path | None = None) -> list[tuple[str, Path]]:
    """(relative name, path) of every image under ``input_dir`` by suffix, sorted; hidden entries and ``skip`` left out."""
    from .train.data import IMAGE_SUFFIXES

    found = []
    for root, dirs, files in os.walk(input_dir):
        dirs[:] = sorted(d for d in dirs if not d.startswith(".") and (skip is None or Path(root, d).resolve() != skip))
        for f in files:
            if not f.startswith(".") and Path(f).suffix.lower() in IMAGE_SUFFIXES:
                path = Path(root, f)
                found.append((path.relative_to(input_dir).as_posix(), path))
    return sorted(found)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open_regular(path) as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _canonical(name: str, value: Any) -> Any:
    """A restore option as JSON for the settings record: primitives as they are, config dataclasses as their fields."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if is_dataclass(value) and not isinstance(value, type):
        return {"type": type(value).__name__, **{f.name: _canonical(name, getattr(value, f.name)) for f in fields(value)}}
    raise TypeError(f"restore option {name!r} must be a number, string, bool, None or a config dataclass, "
                    f"got {type(value).__name__}")


LOAD_OPTIONS = {"quantization": ("nf4", "int8", "int4"), "kv_cache": ("int8", "int4"), "max_memory": None}  # None: any


def _check_load_options(model: str | os.PathLike | None, load_options: Mapping[str, Any]) -> None:
    """``Restorer.from_pretrained``'s torch-backend options: known names and values, and a checkpoint folder
    to apply them to (an export's weights were quantized when it was exported). Checked before Ray starts."""
    from .hub import resolve_model
    from .manifest import MANIFEST_FILE

    for name, value in load_options.items():
        if name not in LOAD_OPTIONS:
            raise ValueError(f"unknown load option {name!r}; restore_many takes {', '.join(LOAD_OPTIONS)}")
        if LOAD_OPTIONS[name] is not None and value not in LOAD_OPTIONS[name]:
            raise ValueError(f"{name}={value!r}: choose {' or '.join(map(repr, LOAD_OPTIONS[name]))}")
    if load_options and (model is None or (resolve_model(model) / MANIFEST_FILE).is_file()):
        raise PureLiteError(f"{', '.join(f'{k}={v}' for k, v in load_options.items())} applies to a checkpoint folder "
                            f"(the torch backend); {model or 'the default model'} is an export, its weights quantized "
                            "when it was exported")


def _check_restore_options(restore_options: Mapping[str, Any]) -> None:
    """The values Restorer.restore would refuse for every image (``scale`` -2, ``target_size`` 7), refused here,
    before the journal records them as the run's settings."""
    from .restorer import check_restore_options

    check_restore_options(**{k: restore_options[k] for k in ("scale", "target_size", "tile_batch")
                             if k in restore_options})


def _check_model(model: str | os.PathLike | None, local: bool) -> None:
    """A model folder that cannot be loaded, found before Ray starts (CheckpointError). On a cluster the folder
    must exist on the workers' nodes, not necessarily here: there it is checked only when present."""
    from .checkpoint import CheckpointFiles
    from .manifest import MANIFEST_FILE, Manifest

    if model is None:
        return  # the shipped PURE-tiny; a broken installation is reported by the first worker
    path = Path(model)
    if not path.exists() and not local:
        return
    if (path / MANIFEST_FILE).is_file():
        Manifest.load(path, verify_checksums=False)  # each worker verifies the checksums when it loads
    else:
        CheckpointFiles.locate(path)


def _settings(model: str | os.PathLike | None, seed: int, restore_options: Mapping[str, Any],
              load_options: Mapping[str, Any] | None = None) -> dict:
    """What decides the outputs, as JSON: the journal refuses to mix runs whose settings differ. Load options
    (quantized weights, an int8 cache) change the outputs too; they appear only when given, so the journals of
    runs without them keep their settings."""
    from .restorer import Restorer

    allowed = set(inspect.signature(Restorer.restore).parameters) - _NOT_OPTIONS
    unknown = sorted(set(restore_options) - allowed)
    if unknown:
        raise ValueError(f"unknown restore option(s) {', '.join(unknown)}; Restorer.restore accepts {', '.join(sorted(allowed))}")
    if model is None:
        model_id = "PURE-tiny (shipped with pure-lite)"
    else:
        model_id = str(Path(model).resolve()) if Path(model).exists() else str(model)
    settings = {"model": model_id, "seed": seed,
                "restore_options": {k: _canonical(k, v) for k, v in sorted(restore_options.items())}}
    if load_options:
        settings["load_options"] = dict(sorted(load_options.items()))
    return settings


def _settings_sha256(settings: dict) -> str:
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()


def _provenance(path: Path) -> dict | None:
    """The provenance record a restore-many worker wrote into an output PNG, or None."""
    from PIL import Image

    try:
        with Image.open(path) as img:
            return json.loads(img.text[PROVENANCE_KEY])
    except Exception:  # not an image, not a PNG, no record, not JSON: not ours either way
        return None


def _plan(inputs: list[tuple[str, Path]], journal: Journal, output_dir: Path, settings_sha: str,
          retry_failed: bool) -> list[Entry]:
    """Every input's entry for this run (step 1). Only pending ones will be restored."""
    taken = {e.output for e in journal.entries.values()}
    planned = []
    for name, path in inputs:
        unreadable = regular_file_problem(path)  # a FIFO would block the read below
        if unreadable is None:
            try:
                sha = _sha256(path)
            except OSError as exc:
                unreadable = exc.strerror or str(exc)
        if unreadable is not None:
            sha, unreadable = None, f"{name}: cannot read ({unreadable})"
        prev = journal.entries.get(name)
        if prev is None:
            output = output_name(name, taken)
            taken.add(output)
        else:
            output = prev.output
        out = output_dir / output
        same = prev is not None and prev.input_sha256 == sha
        if same and prev.status == "done" and out.is_file():
            entry = prev
        elif same and prev.status == "failed" and not retry_failed:
            entry = prev
        elif unreadable:
            entry = Entry(name, "failed", None, output, error=unreadable)
        elif out.exists():
            mark = _provenance(out)
            if mark is not None and (mark.get("input_sha256"), mark.get("settings_sha256")) == (sha, settings_sha):
                # Written by an earlier run that was killed before its journal line: done, not redone.
                entry = Entry(name, "done", sha, output, degradation=mark.get("degradation"))
            else:
                entry = Entry(name, "failed", sha, output,
                              error=f"{out} exists and was not restored from this input with these settings; "
                                    "move it away to restore this input (outputs are never overwritten)")
        else:
            entry = Entry(name, "pending", sha, output, attempts=prev.attempts if same else 0)
        planned.append(entry)
    # Inputs that are gone from INPUT_DIR keep their lines: their output names stay reserved.
    names = {e.name for e in planned}
    journal.rewrite(planned + [e for e in journal.entries.values() if e.name not in names])
    return planned


def _ray():
    try:
        import ray
    except ImportError as exc:
        raise MissingDependencyError('restore-many runs on Ray: pip install "pure-lite[ray]"') from exc
    return ray


class RestoreWorker:
    """One Ray actor: loads the model once, then restores image after image (made remote in ``_Pool``)."""

    def __init__(self, model: str | None, device: str, load_options: Mapping[str, Any] | None = None,
                 gpu_share: float = 1.0):
        from .manifest import MANIFEST_FILE
        from .restorer import Restorer

        self.error = None
        load_options = dict(load_options or {})
        try:
            if (device == "cuda" and gpu_share < 1 and "max_memory" not in load_options and model is not None
                    and not (Path(model) / MANIFEST_FILE).is_file()):
                from .torch_backend.memory import share_budget

                load_options["max_memory"] = share_budget(gpu_share)  # the memory plan of its share of the GPU
            self.restorer = Restorer.from_pretrained(model, device=device, **load_options)
        except (PureLiteError, ValueError) as exc:  # ValueError: e.g. int4 asked of a CPU worker
            self.restorer, self.error = None, str(exc)

    def ready(self) -> tuple[int, str, str | None, tuple[int, int] | None]:
        """(process id, node address, why the model did not load or None, the model's (tile side, trained
        scale) or None): the driver plans every image's tiles with them, for a progress in tiles."""
        c = self.restorer.components if self.restorer is not None else None
        return (os.getpid(), _ray().util.get_node_ip_address(), self.error,
                None if c is None else (c.image_size, c.trained_scale))

    def restore(self, name: str, data: bytes, seed: int, options: dict, provenance: dict, tracker=None) -> dict:
        """Restore one image's bytes. Every error comes back as a value, so only a dying process fails the call.
        ``tracker`` (a ``TileTracker`` actor) hears of each batch of tiles done, without waiting for an answer."""
        from PIL.PngImagePlugin import PngInfo

        progress = _whole_tiles(lambda done: tracker.report.remote(name, done)) if tracker is not None else False
        t0 = time.perf_counter()
        try:
            result = self.restorer.restore(data, seed=seed, progress=progress, **options)
        except PureLiteError as exc:  # this image: unreadable, or decoding could not finish
            message = str(exc).replace("image bytes", name)  # images.py labels what it decoded "image bytes"
            return {"status": "failed", "error": message if name in message else f"{name}: {message}"}
        except (TypeError, ValueError) as exc:  # the options, not this image: every image would fail alike
            return {"status": "rejected", "error": f"{type(exc).__name__}: {exc}"}
        except Exception as exc:  # anything else is recorded against this image; the run goes on
            return {"status": "failed", "error": f"{name}: {type(exc).__name__}: {exc}"}
        seconds = time.perf_counter() - t0
        info = PngInfo()
        info.add_text(PROVENANCE_KEY, json.dumps({**provenance, "seed": seed, "degradation": result.degradation,
                                                  "model": self.restorer.components.description}))
        png = io.BytesIO()
        result.image.save(png, format="PNG", pnginfo=info, icc_profile=result.image.info.get("icc_profile"))
        return {"status": "done", "png": png.getvalue(), "seconds": seconds, "degradation": result.degradation}


class TileTracker:
    """A Ray actor (no CPU reserved) that collects the tiles each worker has done of the image it holds, so
    the driver shows tiles done across all workers while images are still in progress."""

    def __init__(self):
        self.done: dict[str, int] = {}

    def report(self, name: str, done: int) -> None:
        self.done[name] = done

    def take(self) -> dict[str, int]:
        """The reports since the last call: image name -> tiles done."""
        done, self.done = self.done, {}
        return done


class _Pool:
    """The workers: start, replace the dead, and stop them all."""

    def __init__(self, ray, model: str | None, count: int, gpus: float, cpus: float,
                 load_options: Mapping[str, Any] | None = None):
        self.ray = ray
        self.cls = ray.remote(RestoreWorker).options(num_gpus=gpus, num_cpus=cpus, max_restarts=0)
        self.model, self.device, self.load_options = model, "cuda" if gpus > 0 else "cpu", load_options
        self.gpus = gpus
        self.count = count
        self.actors = []  # every actor started, the dead included
        self.starting = {}  # ready() ref -> actor
        for _ in range(count):
            self.start()

    def start(self) -> None:
        actor = self.cls.remote(self.model, self.device, self.load_options, min(self.gpus, 1.0) or 1.0)
        self.actors.append(actor)
        self.starting[actor.ready.remote()] = actor

    def stop(self) -> None:
        for actor in self.actors:
            self.ray.kill(actor)
        self.actors = []


def _resolve_shape(ray, config: BatchConfig, local: bool) -> tuple[int, float]:
    """Workers and GPUs per worker from the config, defaulting to one worker per GPU; refuse what cannot fit locally."""
    resources = ray.cluster_resources()
    gpus_total, cpus_total = resources.get("GPU", 0.0), resources.get("CPU", 0.0)
    gpus = config.gpus_per_worker if config.gpus_per_worker is not None else (1.0 if gpus_total >= 1 else 0.0)
    workers = config.workers if config.workers is not None else (int(gpus_total // gpus) if gpus > 0 else 1)
    if workers < 1:
        raise PureLiteError(f"{gpus} GPUs per worker do not fit the cluster's {gpus_total:g} GPUs")
    if local and (workers * gpus > gpus_total or workers * config.cpus_per_worker > cpus_total):
        # On a cluster an autoscaler may add nodes; on a Ray of this machine the workers would wait forever.
        raise PureLiteError(f"{workers} workers x ({gpus:g} GPU, {config.cpus_per_worker:g} CPU) do not fit the "
                            f"{gpus_total:g} GPUs and {cpus_total:g} CPUs Ray has here; lower --workers or the per-worker shares")
    return workers, gpus


def _connect(ray, address: str | None, quiet_ray: bool = False) -> bool:
    """Connect to Ray (step 2); True when this call connected, so the run must disconnect (and stop a Ray it started).
    ``quiet_ray``: Ray's warnings (token authentication, say) are not shown either, only its errors."""
    if ray.is_initialized():
        return False
    import logging

    level = logging.ERROR if quiet_ray else logging.WARNING
    logging.getLogger("ray").setLevel(level)  # some warnings come from ray.init itself, before it applies the level
    quiet = {"logging_level": level, "log_to_driver": False}  # errors come back as values, not as logs
    try:
        if address is None:
            ray.init(address="local", include_dashboard=False, **quiet)  # never join a cluster by accident
        else:
            ray.init(address=address, **quiet)
    except (ConnectionError, RuntimeError, ValueError) as exc:
        raise PureLiteError(f"cannot start or reach Ray{f' at {address}' if address else ''}: {exc}") from exc
    return True


def _write_report(path: Path, settings: dict, report: BatchReport) -> None:
    from .images import write_bytes_atomic

    data = {
        "settings": settings,
        "summary": {"inputs": len(report.entries), "done": report.count("done"), "failed": report.count("failed"),
                    "pending": report.count("pending"), "restored_by_this_run": report.restored,
                    "seconds": round(report.seconds, 3), "images_per_minute": round(report.images_per_minute, 3)},
        "images": [{"input": e.name, "status": e.status, "output": e.output if e.status == "done" else None,
                    "seconds": e.seconds, "degradation": e.degradation, "error": e.error, "attempts": e.attempts}
                   for e in report.entries],
    }
    write_bytes_atomic((json.dumps(data, indent=2, ensure_ascii=False) + "\n").encode(), path)


def restore_many(
    input_dir: str | os.PathLike,
    output_dir: str | os.PathLike,
    *,
    model: str | os.PathLike | None = None,
    restore_options: Mapping[str, Any] | None = None,
    load_options: Mapping[str, Any] | None = None,
    seed: int = BASE_SEED,
    config: BatchConfig = BatchConfig(),
    progress: bool = True,
    on_dispatch: Callable[[str, WorkerInfo], None] | None = None,
    quiet_ray: bool = False,
) -> BatchReport:
    """Restore every image under INPUT_DIR into OUTPUT_DIR (``sub/a.jpg`` -> ``sub/a_restored.png``) on Ray workers.

    ``model`` is a checkpoint or export folder present at that path on every worker's node, or a
    Hugging Face Hub id that each worker resolves in its own node's cache (pure_lite.hub; None: the
    shipped PURE-tiny). ``restore_options`` are passed to ``Restorer.restore`` for every image
    (e.g. ``{"target_size": 128, "sampling": SamplingConfig(...)}``); ``load_options`` to each worker's
    ``Restorer.from_pretrained`` (a checkpoint folder's ``quantization`` and ``kv_cache``, see
    ``LOAD_OPTIONS``); each image's seed is
    ``image_seed(seed, name)``. The model, seed and options are the run's settings: OUTPUT_DIR's
    journal refuses a run with other ones. Rerunning resumes: done inputs are skipped, failed ones
    are retried only with ``config.retry_failed``; Ray is started only when something is left to do.
    ``on_dispatch(name, worker)`` is called as each image is sent to a worker (for monitoring);
    ``quiet_ray`` keeps Ray's warnings off the terminal (the command's -q).
    Returns the report that is also written to OUTPUT_DIR/restore-many-report.json (written too
    when the run stops early, e.g. on Ctrl-C, whose KeyboardInterrupt propagates).
    """
    t_start = time.perf_counter()
    input_dir, output_dir = Path(input_dir), Path(output_dir)
    if not input_dir.is_dir():
        raise PureLiteError(f"input folder {input_dir} does not exist or is not a folder")
    src, dst = input_dir.resolve(), output_dir.resolve()
    if src == dst or src.is_relative_to(dst):
        raise PureLiteError(f"the output folder {output_dir} must not be the input folder or contain it")
    restore_options, load_options = dict(restore_options or {}), dict(load_options or {})
    _check_load_options(model, load_options)
    settings = _settings(model, seed, restore_options, load_options)
    _check_restore_options(restore_options)
    _check_model(model, local=config.address is None)
    inputs = find_images(input_dir, skip=dst if dst.is_relative_to(src) else None)
    if not inputs:
        from .train.data import IMAGE_SUFFIXES

        raise InvalidImageError(f"no image found under {input_dir}: restore-many looks for files ending in "
                                f"{', '.join(sorted(IMAGE_SUFFIXES))} (hidden files and folders left out)")

    with Journal(output_dir, settings) as journal:
        entries = _plan(inputs, journal, output_dir, _settings_sha256(settings), config.retry_failed)
        run = _Run(journal, input_dir, {p.resolve() for _, p in inputs}, model, seed, restore_options, config,
                   progress, on_dispatch, quiet_ray)
        stopped = True
        try:
            pending = [e for e in entries if e.status == "pending"]
            if pending:
                run.go(pending)
            stopped = False
        finally:
            report = BatchReport([journal.entries[e.name] for e in entries], run.restored,
                                 time.perf_counter() - t_start, output_dir / REPORT_FILE)
            try:
                _write_report(report.report_path, settings, report)
            except OutputError:
                if not stopped:  # else the error that stopped the run (a full disk, say) is the one to report
                    raise
    return report


class _Run:
    """Steps 2 and 3: start the workers, keep each one busy, record each outcome as it arrives."""

    def __init__(self, journal: Journal, input_dir: Path, input_paths: set[Path], model, seed: int,
                 restore_options: dict, config: BatchConfig, progress: bool, on_dispatch, quiet_ray: bool = False):
        self.journal, self.input_dir, self.input_paths = journal, input_dir, input_paths
        self.model = None if model is None else journal.settings["model"]  # resolved where it exists here
        self.seed, self.options, self.config = seed, restore_options, config
        self.settings_sha = _settings_sha256(journal.settings)
        self.progress, self.on_dispatch, self.quiet_ray = progress, on_dispatch, quiet_ray
        self.restored = self.failed = self.finished = 0
        self.deaths_in_a_row = 0

    def go(self, pending: list[Entry]) -> None:
        from .console import TileProgress

        ray = self.ray = _ray()
        started_here = _connect(ray, self.config.address, self.quiet_ray)
        self.pending = len(pending)
        self.shown = TileProgress(self._label(), unit="tiles") if self.progress else None
        self.tiles: dict[str, int] | None = None  # image -> its tiles, planned once a worker tells the tile side
        self.tiles_done: dict[str, int] = {}
        self.tracker = None
        self.pool = None
        try:
            count, gpus = _resolve_shape(ray, self.config, local=self.config.address is None)
            if self.shown is not None:
                self.tracker = ray.remote(TileTracker).options(num_cpus=0).remote()
            self.pool = _Pool(ray, self.model, count, gpus, self.config.cpus_per_worker,
                              self.journal.settings.get("load_options"))
            self.queue, self.idle = deque(pending), []
            self.workers: dict = {}  # actor -> WorkerInfo, once it has loaded the model
            self.running: dict = {}  # restore() ref -> (actor, entry)
            while self.queue or self.running:
                while self.idle and self.queue:
                    self._send(self.idle.pop(), self.queue.popleft())
                # with a progress display, wake up every second to show the tiles the workers report
                ready = ray.wait(list(self.running) + list(self.pool.starting), num_returns=1,
                                 timeout=None if self.tracker is None else 1.0)[0]
                if not ready:
                    self._show(ray.get(self.tracker.take.remote()))
                elif ready[0] in self.pool.starting:
                    self._on_started(ready[0])
                else:
                    self._on_result(ready[0])
        finally:
            if self.shown is not None:
                self.shown.close()
            if self.pool is not None:
                self.pool.stop()
            if started_here:
                ray.shutdown()

    def _send(self, actor, entry: Entry) -> None:
        try:
            data = read_regular(self.input_dir / entry.name)
        except OSError as exc:
            self._finish(entry, status="failed", error=f"{entry.name}: cannot read ({exc.strerror or exc})")
            self.idle.append(actor)
            return
        sha = hashlib.sha256(data).hexdigest()  # of the bytes sent, should the file have changed since step 1
        entry = replace(entry, input_sha256=sha, attempts=entry.attempts + 1)
        self.journal.record(entry)  # the attempt counts from now: a kill of the whole run leaves it recorded
        provenance = {"input": entry.name, "input_sha256": sha, "settings_sha256": self.settings_sha}
        ref = actor.restore.remote(entry.name, data, image_seed(self.seed, entry.name), self.options, provenance,
                                   self.tracker)
        self.running[ref] = (actor, entry)
        if self.on_dispatch is not None:
            self.on_dispatch(entry.name, self.workers[actor])

    def _on_started(self, ref) -> None:
        actor = self.pool.starting.pop(ref)
        try:
            pid, node, error, model = self.ray.get(ref)
        except _worker_died(self.ray) as exc:
            self._on_death(exc)
            return
        if error is not None:
            raise PureLiteError(f"a worker could not load the model: {error}")
        self.workers[actor] = WorkerInfo(pid, node)
        self.idle.append(actor)
        if self.tiles is None:
            self._plan_tiles(*model)

    def _on_result(self, ref) -> None:
        actor, entry = self.running.pop(ref)
        try:
            result = self.ray.get(ref)
        except _worker_died(self.ray) as exc:
            why = f"its worker died while restoring it ({type(exc).__name__})"
            if entry.attempts >= self.config.max_attempts:
                self._finish(entry, status="failed", error=f"{entry.name}: {why}, {entry.attempts} times")
            else:
                entry = replace(entry, error=why)
                self.journal.record(entry)
                self.queue.appendleft(entry)  # the next free worker takes it
                self.tiles_done.pop(entry.name, None)  # its tiles start again
            self._on_death(exc)
            return
        self.deaths_in_a_row = 0
        self.idle.append(actor)
        if result["status"] == "rejected":
            raise PureLiteError(f"the restore options were rejected: {result['error']}")
        if result["status"] == "failed":
            self._finish(entry, status="failed", error=result["error"])
            return
        from .images import write_bytes_atomic

        out = self.journal.dir / entry.output
        try:
            if out.resolve() in self.input_paths:
                raise PureLiteError("it is one of the inputs")
            if out.exists():
                raise PureLiteError("it appeared during the run, and outputs are never overwritten")
            write_bytes_atomic(result["png"], out)
        except (OSError, PureLiteError) as exc:
            if isinstance(exc, OSError) and exc.errno in _DISK_FULL:
                # Every image after this one would fail alike: stop, with this one still pending for the rerun.
                raise OutputError(f"{exc}; the run stopped, {self.journal.path} records what is done: free some "
                                  "space and run the same command to resume") from exc
            self._finish(entry, status="failed", error=f"{entry.name}: cannot write {out}: {exc}")
            return
        self.restored += 1
        self._finish(entry, status="done", seconds=result["seconds"], degradation=result["degradation"], error=None)

    def _on_death(self, exc: Exception) -> None:
        """A worker died: start a replacement, unless workers die again and again with nothing finishing."""
        self.deaths_in_a_row += 1
        if self.deaths_in_a_row > 2 * self.pool.count + 1:
            raise PureLiteError(f"workers keep dying ({self.deaths_in_a_row} in a row without a finished image); "
                                f"last: {exc}")
        self.pool.start()

    def _finish(self, entry: Entry, **changes) -> None:
        entry = replace(entry, **changes)
        self.journal.record(entry)
        self.failed += entry.status == "failed"
        self.finished += 1
        if self.tiles is not None:  # a finished image's tiles are done, whether it was restored or failed
            self.tiles_done[entry.name] = self.tiles.get(entry.name, 0)
        self._show({})

    def _plan_tiles(self, tile: int, trained_scale: int) -> None:
        """Plan every pending image's tiles from its size (read from its header) and the model's tile side;
        an image whose header cannot be read counts no tiles (it will fail). Warns of a scale below the
        model's own factor here, in the driver, where it is seen once."""
        import warnings

        from .images import image_size
        from .restorer import below_trained_scale
        from .tiles import TilePlan

        target, scale = self.options.get("target_size"), self.options.get("scale", 4)
        if target is None and scale < trained_scale:
            warnings.warn(below_trained_scale(scale, trained_scale), UserWarning, stacklevel=2)
        self.tiles = {}
        for entry in self.queue:
            try:
                w, h = image_size(self.input_dir / entry.name)
            except Exception:  # unreadable now: its restoration will say why
                self.tiles[entry.name] = 0
                continue
            self.tiles[entry.name] = 1 if target is not None else len(
                TilePlan.cover(max(1, round(w * scale)), max(1, round(h * scale)), tile).boxes)
        self._show({})

    def _show(self, reports: dict[str, int]) -> None:
        """Tiles done over all workers (``reports``: what the tracker heard since the last call)."""
        running = {entry.name for _, entry in self.running.values()}
        self.tiles_done.update({name: done for name, done in reports.items() if name in running})
        if self.shown is None or self.tiles is None:
            return
        self.shown.label = self._label()
        self.shown(sum(self.tiles_done.values()), sum(self.tiles.values()))

    def _label(self) -> str:
        return f"restore-many: {self.finished}/{self.pending} images ({self.failed} failed)"


def _whole_tiles(report: Callable[[int], object]) -> Callable[[float, int], None]:
    """``restore``'s progress (fractions of tiles) as calls of ``report`` only when a whole tile more is done:
    one message to the tracker per tile, not per decoding step."""
    last = [0]

    def progress(done: float, total: int) -> None:
        if int(done) > last[0]:
            last[0] = int(done)
            report(last[0])

    return progress


_DISK_FULL = {errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)}


def _worker_died(ray) -> tuple[type[Exception], ...]:
    return ray.exceptions.RayActorError, ray.exceptions.WorkerCrashedError
