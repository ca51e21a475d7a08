"""Train PURE-tiny's tokenizer and language model from one training pack: the self-contained GPU run.

    python -m pure_lite.train.pack_train PACK.npz OUT --minutes 8

needs nothing but the pack and pure-lite's own dependencies (torch, transformers, safetensors,
numpy, Pillow): no apt, no OpenCV, no SciPy, no scikit-image, no network. It uses CUDA when present
and bf16 autocast where the hardware computes it natively (``config.use_bf16``: both models, on
CUDA and on CPUs with AMX) and writes the trained weights to OUT/model, in the layout
``Restorer.from_pretrained`` and ``export_onnx`` read: the language model in bfloat16 (as PURE's
release), in shards of at most 15 MB so that a borrowed machine can hand every file back (its
limit is 16 MiB a file, 8 files). The trained tokenizer alone is also copied to OUT/vq as soon as it
exists, so a run cut short still returns it. Everything else lives in the work folder (``--work``,
default OUT/work: give a folder outside OUT on a borrowed machine) and is removed at the end:

 1. vq      ``train_vq_on`` over 64x64 windows of the pack's HQ crops (OUT/work/vq.ckpt)
 2. init    a random-init Chameleon with the compact vocabulary and the trained VQ (OUT/work/init), or
            with ``--lm-from`` a trained PURE-tiny's language model over the same VQ (more data for it)
 3. tokens  every (crop, LQ version, horizontal flip) as one conversation: the LQ resized to the HQ
            size with the restore pipeline's own bicubic, both encoded with the trained VQ, the
            assistant's text the degradation sentence of the pack's levels (OUT/work/tokens)
    and the same for the held-out pack (``heldout.npz`` beside PACK, OUT/work/tokens-heldout)
 4. lm      ``finetune.train`` (OUT/work/lm/checkpoints), scoring the held-out conversations every
            200 steps (and before the first) and keeping the best-scoring step's weights (v2's first
            run, which did not, memorised its 4312 conversations: its last step was worse than chance
            on held-out ones)

``--minutes`` bounds the wall-clock time: when it runs out (or at Ctrl-C / SIGTERM), the current
stage saves a checkpoint at the end of its step and the command exits with status 3; the same
command (on any machine, CPU included) resumes.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np

from ..checkpoint import VQ_PICKLE_FILE
from ..errors import PureLiteError
from .config import PRECISIONS, TrainConfig, VQTrainConfig
from .pack import MAX_PACK_BYTES, TrainingPack, hq_batch, load_pack
from .stopping import stop_on_signals

SHIPPED_LIMIT_BYTES = 25_000_000  # the default model's int8 export (docs/pure-tiny.md)
# what v1's int8 export held beyond 1 byte per LM weight and 4 per VQ weight (graphs, heads, tokenizer):
# 14.7 MB shipped against 11.87 MB estimated
EXPORT_OVERHEAD_BYTES = 2_900_000
EXIT_OUT_OF_TIME = 3


@dataclass(frozen=True)
class LMShape:
    """The language model's size (a narrow Chameleon)."""

    hidden_size: int = 320
    num_layers: int = 8
    num_heads: int = 5
    intermediate_size: int = 896
    max_position_embeddings: int = 1024


@dataclass(frozen=True)
class PackTrainConfig:
    """The whole device run; the defaults are the PURE-tiny v2 plan (docs/pure-tiny.md, "Training on a GPU")."""

    vq_base_channels: int = 32
    vq_channel_mult: tuple[int, ...] = (1, 1, 2, 2)
    vq_z_channels: int = 32
    vq_codebook_size: int = 1024  # 4096 measured 0.4 dB worse after 600 CPU steps (docs/pure-tiny.md)
    vq_train: VQTrainConfig = field(default_factory=lambda: VQTrainConfig(
        steps=6000, batch_size=64, crop=64, lr=1e-3, warmup_steps=200, min_lr_ratio=0.1, l2_weight=0.5,
        disc_weight=0.0, restart_every=50, log_every=250, save_every=1000))
    lm: LMShape = field(default_factory=LMShape)
    lm_train: TrainConfig = field(default_factory=lambda: TrainConfig(
        lr=1e-3, max_steps=4000, batch_size=32, warmup_steps=200, min_lr_ratio=0.1, weight_decay=0.1, grad_clip=4.0,
        dropout=0.0, save_every=1000, log_every=100, eval_every=200))
    flips: bool = True  # each crop also enters the LM data mirrored (degradations are mirror-symmetric)
    seed: int = 0
    # a trained PURE-tiny folder whose language model is the starting point instead of a random init
    # (more data for a model that already learned from less); it must share WORK's tokenizer
    lm_from: str | None = None

    def vq_config(self):
        from ..torch_backend.vq import VQConfig

        return VQConfig(base_channels=self.vq_base_channels, channel_mult=self.vq_channel_mult,
                        z_channels=self.vq_z_channels, codebook_size=self.vq_codebook_size)


def shipped_bytes_estimate(config: PackTrainConfig, vocab_size: int) -> int:
    """int8 export size, roughly: LM weights at 1 byte (untied embeddings and head), the VQ kept float32,
    plus ``EXPORT_OVERHEAD_BYTES``; compare with ``SHIPPED_LIMIT_BYTES`` before spending GPU time."""
    from ..torch_backend.vq import VQModel

    vq = sum(p.numel() for p in VQModel(config.vq_config()).parameters())
    h, s = config.lm.hidden_size, config.lm
    lm = 2 * vocab_size * h + s.num_layers * (4 * h * h + 3 * h * s.intermediate_size)
    return 4 * vq + lm + EXPORT_OVERHEAD_BYTES


# ----------------------------------------------------------------------------- stages


def stage_vq(pack: TrainingPack, work: Path, config: PackTrainConfig, device: str, deadline: float, log) -> Path | None:
    from .vq_train import round_trip_psnr, save_vq, train_vq_on

    final = work / "vq" / VQ_PICKLE_FILE
    if final.exists():
        return final
    train_cfg = replace(config.vq_train, seed=config.seed)
    vq, steps = train_vq_on(lambda rng, n, crop: hq_batch(pack.hq, rng, n, crop), config.vq_config(), train_cfg,
                            device=device, checkpoint=work / "vq.ckpt", deadline=deadline, log=log)
    if steps < train_cfg.steps:
        return None
    psnr = round_trip_psnr(vq, pack.hq[:256])
    log(f"vq: round trip of 256 training crops {psnr.mean():.2f} dB (the held-out number comes from the benchmark)")
    return save_vq(vq, work / "vq")


def stage_init(work: Path, vq_file: Path, config: PackTrainConfig) -> Path:
    from ..testing import make_tiny_checkpoint

    out = work / "init"
    if not (out / "config.json").exists():
        tmp = work / "init.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        if config.lm_from:
            _copy_trained_lm(Path(config.lm_from), vq_file, tmp)
        else:
            make_tiny_checkpoint(tmp, seed=config.seed, layout="compact", compact_codebook=config.vq_codebook_size,
                                 init_std=0.02, vq_base_channels=config.vq_base_channels, **asdict(config.lm))
            shutil.copyfile(vq_file, tmp / "vq_ds8_c2i.pt")  # the trained tokenizer replaces the random one
            (tmp / "tiny_checkpoint.json").unlink(missing_ok=True)
        tmp.rename(out)
    return out


def _copy_trained_lm(source: Path, vq_file: Path, dest: Path) -> None:
    """DEST gets SOURCE's language model (config, weights, text tokenizer) beside WORK's VQ. The tokens in
    WORK were encoded with that VQ: a model trained on another one's codes would learn a different language,
    so SOURCE's VQ must encode alike (the same encoder and codebook; its decoder may have been tuned since,
    decoder_tune.py)."""
    from ..checkpoint import CheckpointFiles, load_vq_state_dict
    from .decoder_tune import same_codes

    files = CheckpointFiles.locate(source)
    if not same_codes(load_vq_state_dict(files.vq), load_vq_state_dict(vq_file)):
        raise PureLiteError(f"{source} was trained with another tokenizer than {vq_file} (its encoder or codebook "
                            "differ): its language model cannot start from codes it never saw")
    dest.mkdir(parents=True)
    for f in files.root.iterdir():
        lm_file = f.name == "config.json" or f.name.endswith((".safetensors", ".safetensors.index.json"))
        if (lm_file and not f.name.startswith("vq_")) or f == files.tokenizer:
            shutil.copyfile(f, dest / f.name)
    shutil.copyfile(vq_file, dest / vq_file.name)


def stage_tokens(pack: TrainingPack, init: Path, work: Path, config: PackTrainConfig, device: str, log,
                 name: str = "tokens") -> Path:
    """Write the pack's conversations in pretokenize's shard format (TokenDataset reads them) to WORK/NAME."""
    import torch

    from ..checkpoint import CheckpointFiles
    from ..images import resize
    from ..prompt import TextTokenizer, degradation_sentence, training_example
    from ..tokens import TokenLayout
    from ..torch_backend.load import load_vq
    from .degrade import DEGRADATION_TYPES, LEVELS

    out = work / name
    if (out / "index.json").exists():
        return out
    files = CheckpointFiles.locate(init)
    layout = TokenLayout.from_tokenizer_file(files.tokenizer, files.read_config()["vocab_size"])
    tokenizer = TextTokenizer(files.tokenizer)
    vq = load_vq(files).to(device)
    size = pack.size

    def encode(images: np.ndarray) -> np.ndarray:  # float32 (n, S, S, 3) in [0, 1] -> (n, S/8, S/8) codes
        codes = []
        for i in range(0, len(images), 64):
            x = torch.from_numpy(images[i:i + 64]).to(device).permute(0, 3, 1, 2) * 2 - 1
            with torch.no_grad():
                codes.append(vq.encode(x).cpu().numpy())
        return np.concatenate(codes)

    flips = (False, True) if config.flips else (False,)
    ids_all, samples, offset = [], [], 0
    for flip in flips:
        hq = pack.hq[:, :, ::-1] if flip else pack.hq
        hq_codes = encode(hq.astype(np.float32) / 255.0)
        for k in range(pack.lq.shape[1]):
            lq = pack.lq[:, k, :, ::-1] if flip else pack.lq[:, k]
            lq_up = np.stack([resize(x.astype(np.float32) / 255.0, size) for x in lq])  # what restore feeds the VQ
            lq_codes = encode(lq_up)
            for i in range(len(pack)):
                levels = {t: LEVELS[pack.levels[i, k, j]] for j, t in enumerate(DEGRADATION_TYPES)}
                ids, labels = training_example(tokenizer, layout, layout.encode_image(lq_codes[i]),
                                               degradation_sentence(levels), layout.encode_image(hq_codes[i]))
                ids_all.append(ids.astype(np.int32))
                samples.append({"index": len(samples), "id": f"{i}-{k}-{int(flip)}", "offset": offset,
                                "length": len(ids), "prompt_len": int(np.argmax(labels >= 0))})
                offset += len(ids)
        log(f"tokens: {len(samples)} conversations")
    tmp = work / f"{name}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    np.save(tmp / "shard_00000.ids.npy", np.concatenate(ids_all))
    (tmp / "shard_00000.json").write_text(json.dumps({"samples": samples}))
    # The side the conversations were cut at: the published model records it as the size it restores at.
    (tmp / "index.json").write_text(json.dumps({"shards": 1, "samples": len(samples), "skipped": [],
                                                "image_size": size}))
    tmp.rename(out)
    return out


def heldout_tokens(pack_path, init: Path, work: Path, config: PackTrainConfig, device: str, log) -> Path | None:
    """WORK/tokens-heldout: the conversations of the held-out pack (``heldout.npz`` beside the training
    pack), which the language model stage scores to keep its best step. None (with a warning) when
    neither it nor the pack is there: the run then keeps the last step, memorised or not."""
    if (work / "tokens-heldout" / "index.json").exists():
        return work / "tokens-heldout"
    pack_file = Path(pack_path).with_name("heldout.npz") if Path(pack_path).is_file() else None
    if pack_file is None or not pack_file.is_file():
        log("warning: no held-out pack (heldout.npz beside the training pack) and no WORK/tokens-heldout: "
            "the language model keeps its last step, with no held-out check")
        return None
    return stage_tokens(load_pack(pack_file), init, work, config, device, log, name="tokens-heldout")


def stage_lm(init: Path, tokens: Path, work: Path, config: PackTrainConfig, device: str, deadline: float, log,
             heldout: Path | None = None) -> Path | None:
    from .finetune import train

    lm_out = work / "lm"
    cfg = replace(config.lm_train, seed=config.seed)
    result = train(init, tokens, lm_out, cfg, device=device, deadline=deadline, log=log, heldout_dir=heldout)
    return lm_out if result.finished and (lm_out / "config.json").exists() else None


def publish_model(lm_dir: Path, final: Path, shard: str = "15MB", *, weights: Path | None = None,
                  image_size: int | None = None) -> Path:
    """Re-save the trained model as bfloat16 shards of at most ``shard`` beside its tokenizer and VQ.

    ``weights``: a training checkpoint's ``trainable.safetensors`` to load over ``lm_dir``'s weights
    (publishing a run that ran out of time). ``image_size``: the side it was trained at, written to its
    config.json (``checkpoint.IMAGE_SIZE_KEY``) as the size restore and export default to; a finished
    run's model already has it (finetune records its tokens' side), the starting one of a partial does not.
    """
    import torch
    from safetensors.torch import load_file

    from ..checkpoint import IMAGE_SIZE_KEY, CheckpointFiles
    from ..torch_backend.chameleon import load_language_model

    files = CheckpointFiles.locate(lm_dir)
    tmp = final.with_name(final.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    lm = load_language_model(files, device="cpu")
    if weights is not None:
        state = load_file(str(weights))
        unknown = set(state) - {n for n, _ in lm.named_parameters()}
        if unknown:
            raise PureLiteError(f"{weights} does not match {lm_dir} (e.g. {sorted(unknown)[:3]})")
        lm.load_state_dict(state, strict=False)
    lm = lm.to(torch.bfloat16)
    if image_size is not None:
        setattr(lm.config, IMAGE_SIZE_KEY, image_size)
    lm.save_pretrained(tmp, max_shard_size=shard)
    (tmp / "generation_config.json").unlink(missing_ok=True)
    shutil.copyfile(files.tokenizer, tmp / files.tokenizer.name)
    shutil.copyfile(files.vq, tmp / files.vq.name)
    tmp.rename(final)
    return final


def _default_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def run(pack_path: str | Path, out: str | Path, config: PackTrainConfig = PackTrainConfig(), *,
        minutes: float | None = None, device: str | None = None, work: str | Path | None = None,
        keep_work: bool = False, publish_partial: bool = False, log=print) -> Path | None:
    """The whole run; returns OUT/model, or None when ``minutes`` ran out first (run again to resume).

    ``publish_partial``: when time runs out during the language model, also write its weights as
    they are to OUT/model-partial (a borrowed machine's work folder is lost with the machine; the
    partial model can still be exported, measured, or fine-tuned further as a new init).
    """
    import torch

    say = log or (lambda message: None)
    deadline = time.monotonic() + 60 * minutes if minutes else None
    device = device or _default_device()
    if device.startswith("cuda"):
        torch.backends.cuda.matmul.allow_tf32 = True  # the VQ's convolutions and the LM's fp32 parts
        torch.backends.cudnn.allow_tf32 = True
    out = Path(out)
    final = out / "model"
    if (final / "config.json").exists():
        say(f"{final} already holds a trained model")
        return final
    work = Path(work) if work is not None else out / "work"
    work.mkdir(parents=True, exist_ok=True)
    (work / "config.json").write_text(json.dumps(asdict(config), indent=1, default=str))
    vocab = 4 + 256 + 4 + 16 + config.vq_codebook_size  # testing._compact_vocab: basic, bytes, markers, grids, codes
    say(f"int8 export estimate {shipped_bytes_estimate(config, vocab) / 1e6:.1f} MB "
        f"(limit {SHIPPED_LIMIT_BYTES / 1e6:.0f} MB)")
    started = time.monotonic()
    prepared = prepare(pack_path, work, config, device, deadline, say)
    if prepared is None:
        return None
    vq_file, init, tokens, heldout = prepared
    if not (out / "vq" / vq_file.name).exists():
        (out / "vq").mkdir(parents=True, exist_ok=True)
        shutil.copyfile(vq_file, out / "vq" / vq_file.name)
    model = stage_lm(init, tokens, work, config, device, deadline, say, heldout)
    if model is None:
        from .finetune import weights_so_far
        from .pretokenize import tokens_image_size

        source = weights_so_far(work / "lm" / "checkpoints")
        if publish_partial and source is not None:
            shutil.rmtree(out / "model-partial", ignore_errors=True)
            publish_model(init, out / "model-partial", weights=source[0], image_size=tokens_image_size(tokens))
            say(f"wrote the language model as of {source[1]} to {out / 'model-partial'}")
        return None
    final.parent.mkdir(parents=True, exist_ok=True)
    publish_model(model, final)  # its config.json has the tokens' side: training recorded it
    if not keep_work:
        shutil.rmtree(work)
    say(f"saved the trained model to {final} ({time.monotonic() - started:.0f} s)")
    return final


def prepare(pack_path, work: Path, config: PackTrainConfig, device: str, deadline: float | None, say,
            max_pack_bytes: int = MAX_PACK_BYTES):
    """Stages 1-3 (VQ, init, tokens and held-out tokens) in WORK; returns their paths, or None when time ran out.

    The pack feeds only these stages: once WORK holds the VQ and the tokens (say, made on a CPU, with
    ``--tokens-only``, which reads a pack of any size), a borrowed GPU needs those folders instead of
    the pack, which is not read.
    """
    if (work / "vq" / VQ_PICKLE_FILE).exists() and (work / "tokens" / "index.json").exists():
        pack = None
        say(f"vq and tokens found in {work}: the pack is not read; device {device}")
    else:
        pack = load_pack(pack_path, max_bytes=max_pack_bytes)
        say(f"pack: {len(pack)} crops of {pack.size}px, {pack.lq.shape[1]} LQ versions each, from "
            f"{len(pack.photos)} photos; device {device}")
    started = time.monotonic()
    vq_file = stage_vq(pack, work, config, device, deadline, say)
    if vq_file is None:
        return None
    say(f"vq done ({time.monotonic() - started:.0f} s)")
    init = stage_init(work, vq_file, config)
    tokens = stage_tokens(pack, init, work, config, device, say)
    heldout = heldout_tokens(pack_path, init, work, config, device, say) if config.lm_train.eval_every else None
    return vq_file, init, tokens, heldout


def main(argv: list[str] | None = None) -> int:
    d = PackTrainConfig()
    ap = argparse.ArgumentParser(prog="python -m pure_lite.train.pack_train", description=__doc__.split("\n")[0])
    ap.add_argument("pack", type=Path, help="the training pack (.npz) built by examples/train_pure_tiny.py --pack-only")
    ap.add_argument("out", type=Path, help="output folder: OUT/model gets the weights; OUT/work the resumable state")
    ap.add_argument("--minutes", type=float, default=None, help="wall-clock budget; on expiry save, exit 3, rerun to resume")
    ap.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    ap.add_argument("--vq-codebook-size", type=int, default=d.vq_codebook_size, help=f"(default: {d.vq_codebook_size})")
    ap.add_argument("--vq-z-channels", type=int, default=d.vq_z_channels, help=f"(default: {d.vq_z_channels})")
    ap.add_argument("--vq-steps", type=int, default=d.vq_train.steps, help=f"(default: {d.vq_train.steps})")
    ap.add_argument("--vq-batch", type=int, default=d.vq_train.batch_size, help=f"(default: {d.vq_train.batch_size})")
    ap.add_argument("--lm-steps", type=int, default=d.lm_train.max_steps, help=f"(default: {d.lm_train.max_steps})")
    ap.add_argument("--lm-batch", type=int, default=d.lm_train.batch_size, help=f"(default: {d.lm_train.batch_size})")
    ap.add_argument("--lm-eval-every", type=int, default=None,
                    help="score the held-out conversations every N steps and keep the best step's weights "
                         f"(default: {d.lm_train.eval_every}, or a tenth of --lm-steps when that is fewer; 0: never)")
    ap.add_argument("--lm-from", type=Path, default=None,
                    help="start the language model from this trained PURE-tiny folder instead of a random init "
                         "(same tokenizer as WORK's)")
    ap.add_argument("--lm-lr", type=float, default=d.lm_train.lr,
                    help=f"peak learning rate of the language model (default: {d.lm_train.lr})")
    ap.add_argument("--lm-dropout", type=float, default=d.lm_train.dropout,
                    help=f"dropout in the language model while it trains (default: {d.lm_train.dropout})")
    ap.add_argument("--precision", choices=PRECISIONS, default="auto",
                    help="bf16 autocast for both models, or fp32 (auto: bf16 where it is native, CUDA and CPUs "
                         "with AMX; pure_lite.train.config.use_bf16)")
    ap.add_argument("--work", type=Path, default=None, help="resumable state (default: OUT/work)")
    ap.add_argument("--publish-partial", action="store_true",
                    help="when time runs out during the language model, write its weights to OUT/model-partial")
    ap.add_argument("--keep-work", action="store_true", help="keep the work folder (checkpoints, tokens) after success")
    ap.add_argument("--tokens-only", action="store_true",
                    help="stop once WORK holds the VQ and the tokens (a VQ already in WORK/vq is kept): what a GPU "
                         "machine is then given instead of the pack (examples/pure_tiny_gpu_sitting.sh)")
    args = ap.parse_args(argv)
    eval_every = args.lm_eval_every if args.lm_eval_every is not None else min(d.lm_train.eval_every,
                                                                               max(1, args.lm_steps // 10))
    config = replace(d, vq_codebook_size=args.vq_codebook_size, vq_z_channels=args.vq_z_channels,
                     lm_from=str(args.lm_from) if args.lm_from else None,
                     vq_train=replace(d.vq_train, steps=args.vq_steps, batch_size=args.vq_batch,
                                         save_every=min(d.vq_train.save_every, args.vq_steps), precision=args.precision),
                     lm_train=replace(d.lm_train, max_steps=args.lm_steps, batch_size=args.lm_batch, lr=args.lm_lr,
                                      precision=args.precision, eval_every=eval_every, dropout=args.lm_dropout,
                                      save_every=min(d.lm_train.save_every, args.lm_steps),
                                      warmup_steps=min(d.lm_train.warmup_steps, max(1, args.lm_steps // 10))))
    say = lambda m: print(m, flush=True)  # noqa: E731
    try:
        with stop_on_signals(say):  # Ctrl-C / SIGTERM: checkpoint at the end of the step, exit 3, rerun resumes
            if args.tokens_only:
                work = args.work or args.out / "work"
                work.mkdir(parents=True, exist_ok=True)
                deadline = time.monotonic() + 60 * args.minutes if args.minutes else None
                prepared = prepare(args.pack, work, config, args.device or _default_device(), deadline, say,
                                   max_pack_bytes=sys.maxsize)
                if prepared is not None:
                    say(f"tokens ready in {work}")
                return 0 if prepared is not None else EXIT_OUT_OF_TIME
            model = run(args.pack, args.out, config, minutes=args.minutes, device=args.device, work=args.work,
                        keep_work=args.keep_work, publish_partial=args.publish_partial, log=say)
    except PureLiteError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0 if model is not None else EXIT_OUT_OF_TIME


if __name__ == "__main__":
    sys.exit(main())
