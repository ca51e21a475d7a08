"""Pre-tokenization: every conversation to token ids once, in shards, resumable.

    TOKENS_DIR/
      shard_00000.ids.npy     int32, the ids of the shard's samples, concatenated
      shard_00000.json        per sample: id, offset, length, prompt_len (labels are -100 before it)
      index.json              shards, counts, skipped samples with reasons, tokenizer sha256, and
                              image_size when every HQ image has the same side (what a model trained
                              on these tokens records as the size it restores at)

Shard k always holds conversations [k * shard_size, (k+1) * shard_size) of conversations.json
(bad ones skipped), and is written atomically (ids first, then its JSON), so an interrupted
run resumes at the first shard without a JSON and produces the same files as an
uninterrupted one.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from ..atomic import atomic_path
from ..checkpoint import CheckpointFiles
from ..errors import InvalidImageError, PureLiteError
from ..images import load_image, resize, to_model_input
from ..manifest import sha256_of
from ..prompt import IGNORE_INDEX, TextTokenizer, training_example
from ..tokens import GRID_PIXELS, TokenLayout
from .data import IMAGE_PLACEHOLDER


class BadSample(PureLiteError, ValueError):
    """A conversation that cannot become a training example."""


@dataclass
class TokenizeReport:
    samples: int = 0
    skipped: list[dict] = field(default_factory=list)
    shards_written: int = 0


def _atomic_bytes(path: Path, write: Callable) -> None:
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        write(f)


def _split(value: str, where: str) -> tuple[str, str]:
    if value.count(IMAGE_PLACEHOLDER) != 1:
        raise BadSample(f"{where} must contain exactly one {IMAGE_PLACEHOLDER}, has {value.count(IMAGE_PLACEHOLDER)}")
    before, after = value.split(IMAGE_PLACEHOLDER)
    return before, after


def sample_to_ids(record: dict, data_dir: Path, tokenizer: TextTokenizer, layout: TokenLayout,
                  encode) -> tuple[np.ndarray, int, int]:
    """(ids, prompt_len, the HQ image's side) of one record, or BadSample naming what is wrong."""
    turns = record.get("conversations")
    if not isinstance(turns, list) or len(turns) != 2 or [t.get("from") for t in turns] != ["human", "gpt"]:
        raise BadSample("conversations must be one human turn then one gpt turn")
    instruction, _ = _split(turns[0]["value"], "the human turn")
    response, _ = _split(turns[1]["value"], "the gpt turn")
    images = record.get("image")
    if not isinstance(images, list) or len(images) != 2:
        raise BadSample(f"2 {IMAGE_PLACEHOLDER} placeholders but {len(images or [])} images")
    try:
        hq = load_image(data_dir / images[1])
        lq = load_image(data_dir / images[0])
    except InvalidImageError as exc:
        raise BadSample(str(exc)) from exc
    side = hq.shape[0]
    if hq.shape[0] != hq.shape[1] or side % GRID_PIXELS:
        raise BadSample(f"HQ image must be square with a side that is a multiple of {GRID_PIXELS}, got {hq.shape[:2]}")
    lq_codes = encode(to_model_input(resize(lq, side)))  # the LQ input is resized to the model size first
    hq_codes = encode(to_model_input(hq))
    ids, labels = training_example(tokenizer, layout, layout.encode_image(lq_codes), response.rstrip(),
                                   layout.encode_image(hq_codes), instruction=instruction)
    return ids, int(np.argmax(labels != IGNORE_INDEX)), side


def pretokenize(
    data_dir: str | os.PathLike,
    model_dir: str | os.PathLike,
    out_dir: str | os.PathLike | None = None,
    *,
    shard_size: int = 64,
    progress: Callable | None = None,
    max_shards: int | None = None,
) -> TokenizeReport:
    """Tokenize DATA_DIR/conversations.json with the checkpoint's tokenizer and VQ (resumable).

    ``max_shards`` stops after writing that many new shards (used to test interruption).
    """
    import torch

    from ..torch_backend.load import load_vq

    data_dir = Path(data_dir)
    out = Path(out_dir) if out_dir is not None else data_dir / "tokens"
    out.mkdir(parents=True, exist_ok=True)
    files = CheckpointFiles.locate(model_dir)
    tokenizer_sha = sha256_of(files.tokenizer)
    stamp = out / "tokenizer.sha256"
    if stamp.exists() and stamp.read_text().strip() != tokenizer_sha:
        raise PureLiteError(f"{out} was tokenized with another tokenizer; use a new output folder")
    stamp.write_text(tokenizer_sha + "\n")
    layout = TokenLayout.from_tokenizer_file(files.tokenizer, files.read_config()["vocab_size"])
    tokenizer = TextTokenizer(files.tokenizer)
    vq = load_vq(files)

    def encode(pixels):
        with torch.no_grad():
            return vq.encode(torch.from_numpy(pixels))[0].numpy()

    records = json.loads((data_dir / "conversations.json").read_text(encoding="utf-8"))
    n_shards = (len(records) + shard_size - 1) // shard_size
    report = TokenizeReport()
    shards = range(n_shards)
    for k in progress(shards, desc="tokenizing", unit="shard") if progress else shards:
        meta_path = out / f"shard_{k:05d}.json"
        if meta_path.exists():
            continue
        if max_shards is not None and report.shards_written >= max_shards:
            break
        chunks, samples, offset = [], [], 0
        for i, record in enumerate(records[k * shard_size:(k + 1) * shard_size], start=k * shard_size):
            try:
                ids, prompt_len, side = sample_to_ids(record, data_dir, tokenizer, layout, encode)
            except (BadSample, KeyError, TypeError, AttributeError) as exc:
                samples.append({"index": i, "id": str(record.get("id", i)) if isinstance(record, dict) else str(i),
                                "skipped": f"{type(exc).__name__}: {exc}"})
                continue
            chunks.append(ids.astype(np.int32))
            samples.append({"index": i, "id": record.get("id", str(i)), "offset": offset, "length": len(ids),
                            "prompt_len": prompt_len, "image_size": side})
            offset += len(ids)
        ids_all = np.concatenate(chunks) if chunks else np.zeros(0, np.int32)
        _atomic_bytes(out / f"shard_{k:05d}.ids.npy", lambda f: np.save(f, ids_all))
        _atomic_bytes(meta_path, lambda f: f.write(json.dumps({"samples": samples}, indent=1).encode()))
        report.shards_written += 1
    complete = all((out / f"shard_{k:05d}.json").exists() for k in range(n_shards))
    if complete:
        index, sides = {"shards": n_shards, "samples": 0, "skipped": []}, set()
        for k in range(n_shards):
            for s in json.loads((out / f"shard_{k:05d}.json").read_text())["samples"]:
                if "skipped" in s:
                    index["skipped"].append({"sample": s["id"], "path": str(data_dir / "conversations.json"),
                                             "index": s["index"], "reason": s["skipped"]})
                else:
                    index["samples"] += 1
                    sides.add(s.get("image_size"))  # None: a shard written before sides were recorded
        if len(sides) == 1 and None not in sides:
            index["image_size"] = sides.pop()
        _atomic_bytes(out / "index.json", lambda f: f.write(json.dumps(index, indent=1).encode()))
        report.samples, report.skipped = index["samples"], index["skipped"]
    return report


def tokens_image_size(tokens_dir: str | os.PathLike) -> int | None:
    """The side every HQ image of a complete tokens folder has, or None when they differ or it was not recorded."""
    return json.loads((Path(tokens_dir) / "index.json").read_text()).get("image_size")


class TokenDataset:
    """The pre-tokenized samples: ``dataset[i]`` is (ids, labels) as int64 arrays."""

    def __init__(self, tokens_dir: str | os.PathLike):
        root = Path(tokens_dir)
        index_path = root / "index.json"
        if not index_path.exists():
            raise PureLiteError(f"{root} has no index.json: pre-tokenization is incomplete (run it again to resume)")
        index = json.loads(index_path.read_text())
        self.items: list[tuple[np.ndarray, int]] = []
        for k in range(index["shards"]):
            ids = np.load(root / f"shard_{k:05d}.ids.npy")
            for s in json.loads((root / f"shard_{k:05d}.json").read_text())["samples"]:
                if "skipped" not in s:
                    self.items.append((ids[s["offset"]:s["offset"] + s["length"]], s["prompt_len"]))

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        ids, prompt_len = self.items[i]
        ids = ids.astype(np.int64)
        labels = ids.copy()
        labels[:prompt_len] = IGNORE_INDEX
        return ids, labels
