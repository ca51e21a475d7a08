"""``pure-lite train``: instruction-tune a Chameleon checkpoint on pre-tokenized PURE conversations.

AdamW (no decay on norms and biases), linear warm-up then cosine decay, gradient clipping and
accumulation, optional z-loss (coefficient x logsumexp^2 of the supervised positions), attention
dropout (the only dropout transformers' Chameleon has), optional gradient checkpointing, bf16
autocast where the device supports it, full or LoRA (peft) fine-tuning, periodic checkpoints with
resume, and a final checkpoint in the layout ``Restorer.from_pretrained`` loads (LoRA merged).

Several GPUs: ``torchrun --nproc_per_node N -m pure_lite.cli train ...`` runs DDP (one process per
GPU, a DistributedSampler, gradients averaged); a single process runs on CPU or one GPU.
"""

from __future__ import annotations

import json
import math
import os
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..checkpoint import IMAGE_SIZE_KEY, CheckpointFiles
from ..errors import PureLiteError
from ..prompt import IGNORE_INDEX
from ..torch_backend.chameleon import load_language_model
from .config import TrainConfig, use_bf16
from .pretokenize import TokenDataset, tokens_image_size
from .stopping import stop_reason


def lr_factor(step: int, total: int, warmup: int, min_ratio: float) -> float:
    """Linear warm-up to 1, then cosine decay to ``min_ratio`` at ``total``."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


class CausalLMLoss(nn.Module):
    """Next-token cross-entropy on supervised positions (+ z-loss), through the decoder and lm_head directly.

    (The stock Chameleon forward masks image tokens out of the logits, which would make the HQ
    image block impossible to learn.)
    """

    def __init__(self, lm, z_loss: float):
        super().__init__()
        self.lm, self.z_loss = lm, z_loss

    def logits(self, input_ids, attention_mask) -> torch.Tensor:
        """(B, T-1, V) float32: the prediction of each next token."""
        hidden = self.lm.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).last_hidden_state
        return self.lm.lm_head(hidden[:, :-1]).float()

    def token_losses(self, input_ids, attention_mask, labels) -> tuple[torch.Tensor, torch.Tensor]:
        """Each position's next-token loss (B, T-1; 0 where unsupervised) and its target (B, T-1), for
        scoring held-out data per token kind."""
        logits, target = self.logits(input_ids, attention_mask), labels[:, 1:]
        nll = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1), ignore_index=IGNORE_INDEX,
                              reduction="none")
        return nll.reshape(target.shape), target

    def forward(self, input_ids, attention_mask, labels):
        logits, target = self.logits(input_ids, attention_mask), labels[:, 1:]
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1), ignore_index=IGNORE_INDEX)
        if self.z_loss:
            lse = torch.logsumexp(logits, dim=-1)[target != IGNORE_INDEX]
            loss = loss + self.z_loss * (lse**2).mean()
        return loss


def collate(batch: list[tuple[np.ndarray, np.ndarray]], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad to the longest sample; padding is masked and unsupervised."""
    n = max(len(ids) for ids, _ in batch)
    ids = np.full((len(batch), n), pad_id, np.int64)
    labels = np.full((len(batch), n), IGNORE_INDEX, np.int64)
    mask = np.zeros((len(batch), n), np.int64)
    for i, (x, y) in enumerate(batch):
        ids[i, :len(x)], labels[i, :len(y)], mask[i, :len(x)] = x, y, 1
    return {"input_ids": torch.from_numpy(ids), "labels": torch.from_numpy(labels),
            "attention_mask": torch.from_numpy(mask)}


@dataclass
class TrainResult:
    out_dir: Path
    steps: int
    losses: list[float] = field(default_factory=list)
    finished: bool = True  # False: stopped early (deadline or stop request) after saving a checkpoint
    heldout: list[tuple[int, float]] = field(default_factory=list)  # (step, held-out loss) scored by this call
    best_step: int | None = None  # the step whose weights the final model has, when held-out tokens were given


def _distributed() -> tuple[int, int, int]:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not torch.distributed.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        torch.distributed.init_process_group(backend)
    return world, int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))


def _apply_dropout(lm, p: float) -> None:
    lm.config.attention_dropout = p
    for module in lm.modules():
        if hasattr(module, "attention_dropout"):
            module.attention_dropout = p


def _latest_checkpoint(folder: Path) -> Path | None:
    """The highest complete step-N folder (a step-N.tmp left by a crash mid-save is not one)."""
    steps = sorted((p for p in folder.glob("step-*") if p.name[5:].isdigit()), key=lambda p: int(p.name[5:]))
    return steps[-1] if steps else None


BEST = "best"  # CHECKPOINTS/best: the best held-out step's trainable weights and its state.json


def weights_so_far(checkpoints: Path) -> tuple[Path, str] | None:
    """The trainable weights an unfinished run stands for, and which step they are: the best held-out
    step's when held-out conversations were scored (what a finished run ends with too), else the latest
    checkpoint's; None before the first checkpoint."""
    state = checkpoints / BEST / "state.json"
    if state.exists():
        return state.with_name("trainable.safetensors"), f"the best held-out step, {json.loads(state.read_text())['step']}"
    latest = _latest_checkpoint(checkpoints)
    return None if latest is None else (latest / "trainable.safetensors", latest.name)


def train(
    model_dir: str | os.PathLike,
    tokens_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    config: TrainConfig = TrainConfig(),
    *,
    device: str | None = None,
    resume: bool = True,
    deadline: float | None = None,
    log: Callable[[str], None] | None = print,
    heldout_dir: str | os.PathLike | None = None,
) -> TrainResult:
    """Fine-tune; checkpoints go to OUT_DIR/checkpoints/step-N, the final model to OUT_DIR itself.

    ``heldout_dir`` (pre-tokenized conversations never trained on) with ``config.eval_every``: their
    loss is scored before the first step, every ``eval_every`` steps and at the last, and the final model
    gets the weights of the step that scored best, not necessarily the last nor even a trained one (a small
    data set is memorised long before a fixed schedule ends: PURE-tiny v2's last step scored 10.9 nats per
    held-out image token, worse than chance). The best weights so far live in OUT_DIR/checkpoints/best,
    so a resumed run keeps them.

    When ``deadline`` (a ``time.monotonic()`` value) passes, or a stop is requested
    (``stopping.stop_on_signals``, single-process runs), before the last step, a checkpoint is
    saved and training stops without writing the final model (``TrainResult.steps`` < the total):
    a borrowed GPU's time runs out, and the run resumes elsewhere from that checkpoint.
    """
    from safetensors.torch import load_file, save_file

    say = log or (lambda message: None)
    world, rank, local_rank = _distributed()
    if device is None:
        device = f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu"
    dev = torch.device(device)
    bf16 = use_bf16(config.precision, dev)
    torch.manual_seed(config.seed)

    files = CheckpointFiles.locate(model_dir)
    lm = load_language_model(files, device=str(dev), attn_implementation="sdpa")
    lm.train()
    _apply_dropout(lm, config.dropout)
    if config.gradient_checkpointing:
        lm.gradient_checkpointing_enable()
    if config.lora_rank:
        from peft import LoraConfig, inject_adapter_in_model

        lora = LoraConfig(r=config.lora_rank, lora_alpha=config.lora_alpha, lora_dropout=config.dropout,
                          target_modules=list(config.lora_targets))
        lm = inject_adapter_in_model(lora, lm)
        for name, param in lm.named_parameters():
            param.requires_grad = "lora_" in name
    module: nn.Module = CausalLMLoss(lm, config.z_loss)
    if world > 1:
        module = nn.parallel.DistributedDataParallel(module, device_ids=[local_rank] if dev.type == "cuda" else None)

    dataset = TokenDataset(tokens_dir)
    max_len = config.max_seq_len or lm.config.max_position_embeddings
    keep = [i for i in range(len(dataset)) if len(dataset.items[i][0]) <= max_len]
    if len(keep) < len(dataset):
        say(f"skipping {len(dataset) - len(keep)} samples longer than {max_len} tokens")
    if not keep:
        raise PureLiteError(f"no training samples in {tokens_dir}")
    per_step = config.batch_size * config.grad_accum * world
    total = config.max_steps or max(1, math.ceil(config.epochs * len(keep) / per_step))

    decay = [p for n, p in lm.named_parameters() if p.requires_grad and p.ndim >= 2]
    no_decay = [p for n, p in lm.named_parameters() if p.requires_grad and p.ndim < 2]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": config.weight_decay},
                                   {"params": no_decay, "weight_decay": 0.0}], lr=config.lr, betas=config.betas)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(s, total, config.warmup_steps, config.min_lr_ratio))

    out = Path(out_dir)
    ckpts = out / "checkpoints"
    ckpts.mkdir(parents=True, exist_ok=True)
    step = 0
    latest = _latest_checkpoint(ckpts) if resume else None
    if latest is not None:
        trainable = load_file(str(latest / "trainable.safetensors"), device=str(dev))
        missing = set(trainable) - {n for n, _ in lm.named_parameters()}
        if missing:
            raise PureLiteError(f"{latest} does not match this model/config (e.g. {sorted(missing)[:3]})")
        lm.load_state_dict(trainable, strict=False)
        optimizer.load_state_dict(torch.load(latest / "optimizer.pt", map_location=dev, weights_only=True))
        scheduler.load_state_dict(torch.load(latest / "scheduler.pt", weights_only=True))
        step = json.loads((latest / "state.json").read_text())["step"]
        say(f"resumed from {latest} at step {step}")

    def batches():
        """Seeded shuffles per epoch; deterministic, so a resumed run sees what the first would have."""
        epoch = 0
        while True:
            order = np.random.default_rng(config.seed + epoch).permutation(keep)
            order = order[rank::world]
            for i in range(0, len(order) - config.batch_size + 1, config.batch_size):
                yield collate([dataset[int(j)] for j in order[i:i + config.batch_size]], pad_id=0)
            epoch += 1

    stream = batches()
    for _ in range(step * config.grad_accum):  # skip what earlier steps consumed
        next(stream)
    losses = []
    judge = _HeldOut(heldout_dir, lm, config, dev, bf16, ckpts / BEST) if heldout_dir and rank == 0 else None
    if judge is not None and config.eval_every < 1:
        raise PureLiteError("held-out tokens were given but eval_every is 0: set how often to score them")
    if judge is not None and step == 0 and judge.best_step is None:
        say(judge.score(0, save_file))  # the starting weights are a candidate: a fine-tune may only make them worse
    while step < total:
        optimizer.zero_grad(set_to_none=True)
        running = 0.0
        for _ in range(config.grad_accum):
            batch = {k: v.to(dev) for k, v in next(stream).items()}
            with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=bf16):
                loss = module(batch["input_ids"], batch["attention_mask"], batch["labels"]) / config.grad_accum
            loss.backward()
            running += float(loss.detach())
        torch.nn.utils.clip_grad_norm_([p for p in lm.parameters() if p.requires_grad], config.grad_clip)
        optimizer.step()
        scheduler.step()
        step += 1
        losses.append(running)
        if rank == 0 and (step % config.log_every == 0 or step == total):
            say(f"step {step}/{total}  loss {running:.4f}  lr {scheduler.get_last_lr()[0]:.2e}")
        if judge is not None and (step % config.eval_every == 0 or step == total):
            say(judge.score(step, save_file))
        if rank == 0 and config.save_every and step % config.save_every == 0 and step < total:
            _save_checkpoint(ckpts / f"step-{step}", lm, optimizer, scheduler, step, config, save_file)
        reason = stop_reason(deadline)
        if reason is not None and step < total:
            if rank == 0:
                if not (ckpts / f"step-{step}").exists():
                    _save_checkpoint(ckpts / f"step-{step}", lm, optimizer, scheduler, step, config, save_file)
                say(f"{reason} at step {step}/{total}; checkpoint saved, run again to go on")
            if world > 1:
                torch.distributed.destroy_process_group()
            return TrainResult(out_dir=out, steps=step, losses=losses, finished=False,
                               heldout=judge.scores if judge else [])

    best_step = None
    if judge is not None and judge.best_step is not None:
        best_step = judge.best_step
        if best_step != step:
            lm.load_state_dict(load_file(str(judge.folder / "trainable.safetensors"), device=str(dev)), strict=False)
            say(f"the final model has step {best_step}'s weights (held-out loss {judge.best:.4f}), not step {step}'s")
    if rank == 0:
        _save_final(lm, files, out, config, image_size=tokens_image_size(tokens_dir))
        say(f"saved the fine-tuned model to {out}")
    if world > 1:
        torch.distributed.destroy_process_group()
    return TrainResult(out_dir=out, steps=step, losses=losses, heldout=judge.scores if judge else [],
                       best_step=best_step)


class _HeldOut:
    """Scores the held-out conversations (mean loss per supervised token) and keeps the best step's
    trainable weights in ``folder`` (written atomically; read back on resume)."""

    def __init__(self, tokens_dir, lm, config: TrainConfig, dev: torch.device, bf16: bool, folder: Path):
        self.dataset = TokenDataset(tokens_dir)
        if len(self.dataset) == 0:
            raise PureLiteError(f"no held-out samples in {tokens_dir}")
        self.lm, self.config, self.dev, self.bf16, self.folder = lm, config, dev, bf16, folder
        self.loss = CausalLMLoss(lm, 0.0)  # not the DDP wrapper: only rank 0 scores
        self.scores: list[tuple[int, float]] = []
        state = folder / "state.json"
        saved = json.loads(state.read_text()) if state.exists() else {}
        self.best, self.best_step = saved.get("loss", math.inf), saved.get("step")

    @torch.no_grad()
    def evaluate(self) -> float:
        was_training = self.lm.training
        self.lm.eval()
        total, count = 0.0, 0
        for i in range(0, len(self.dataset), self.config.batch_size):
            batch = collate([self.dataset[j] for j in range(i, min(i + self.config.batch_size, len(self.dataset)))],
                            pad_id=0)
            batch = {k: v.to(self.dev) for k, v in batch.items()}
            with torch.autocast(self.dev.type, dtype=torch.bfloat16, enabled=self.bf16):
                nll, target = self.loss.token_losses(batch["input_ids"], batch["attention_mask"], batch["labels"])
            total, count = total + float(nll.sum()), count + int((target != IGNORE_INDEX).sum())
        self.lm.train(was_training)
        return total / max(count, 1)

    def score(self, step: int, save_file) -> str:
        loss = self.evaluate()
        self.scores.append((step, loss))
        if loss < self.best:
            self.best, self.best_step = loss, step

            def write(tmp: Path) -> None:
                save_file(_trainable(self.lm), str(tmp / "trainable.safetensors"))
                (tmp / "state.json").write_text(json.dumps({"step": step, "loss": loss}))

            _replace_folder(self.folder, write)
        return f"step {step}  held-out loss {loss:.4f}  (best {self.best:.4f} at step {self.best_step})"


def _trainable(lm) -> dict[str, torch.Tensor]:
    return {n: p.detach().contiguous().cpu() for n, p in lm.named_parameters() if p.requires_grad}


def _replace_folder(path: Path, write: Callable[[Path], None]) -> None:
    """Have ``write`` fill PATH.tmp, then put it in place of PATH: a crash mid-write leaves PATH as it was
    (and a PATH.tmp that ``_latest_checkpoint`` ignores)."""
    tmp = path.with_name(path.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    write(tmp)
    shutil.rmtree(path, ignore_errors=True)
    os.replace(tmp, path)


def _save_checkpoint(path: Path, lm, optimizer, scheduler, step: int, config: TrainConfig, save_file) -> None:
    def write(tmp: Path) -> None:
        save_file(_trainable(lm), str(tmp / "trainable.safetensors"))
        torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
        torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
        (tmp / "state.json").write_text(json.dumps({"step": step, "config": asdict(config)}, indent=1))

    _replace_folder(path, write)


def _save_final(lm, files: CheckpointFiles, out: Path, config: TrainConfig, image_size: int | None) -> None:
    """The released layout: config, safetensors, tokenizer.json and the VQ file, LoRA merged.

    ``image_size``: the side of every training image, recorded in config.json (``IMAGE_SIZE_KEY``) as the
    size the model restores at; None (sides that differ) keeps what the starting checkpoint recorded.
    """
    if config.lora_rank:
        lm = merge_lora(lm)
    lm.eval()
    _apply_dropout(lm, 0.0)
    if image_size is not None:
        setattr(lm.config, IMAGE_SIZE_KEY, image_size)
    lm.save_pretrained(out)
    (out / "generation_config.json").unlink(missing_ok=True)
    shutil.copyfile(files.tokenizer, out / "tokenizer.json")
    shutil.copyfile(files.vq, out / files.vq.name)


def merge_lora(lm):
    """Fold every LoRA adapter into its base weight and remove the adapter modules."""
    from peft.tuners.lora import LoraLayer

    for name, module in list(lm.named_modules()):
        if isinstance(module, LoraLayer):
            module.merge()
            parent = lm.get_submodule(name.rsplit(".", 1)[0]) if "." in name else lm
            setattr(parent, name.rsplit(".", 1)[-1], module.get_base_layer())
    return lm
