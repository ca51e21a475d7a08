"""Training settings (language model and VQ), importable without torch: the CLI reads its defaults here."""

from __future__ import annotations

from dataclasses import dataclass

LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
PRECISIONS = ("auto", "bf16", "fp32")


def check_precision(precision: str) -> None:
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")


def use_bf16(precision: str, device) -> bool:
    """Whether training runs its matmuls and convolutions under bf16 autocast on ``device`` (a torch.device).

    "auto" picks bf16 on CUDA GPUs that support it and on CPUs with AMX tiles (Sapphire Rapids and
    later). Measured on our 2 cores with PURE-tiny v2's shapes: the language model steps 1.7x faster
    than in fp32, the VQ 2.8x (its batches must be contiguous NCHW: channels-last input made the
    bf16 convolutions slower than fp32).
    """
    import torch

    check_precision(precision)
    if precision != "auto":
        return precision == "bf16"
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    return device.type == "cpu" and getattr(torch.cpu, "_is_amx_tile_supported", lambda: False)()


@dataclass(frozen=True)
class TrainConfig:
    """Training knobs (defaults follow the reference run where it states them: docs/pure-format.md §7)."""

    lr: float = 4e-4
    weight_decay: float = 0.1
    betas: tuple[float, float] = (0.9, 0.95)
    epochs: float = 2.0
    max_steps: int | None = None  # overrides epochs when set
    batch_size: int = 1
    grad_accum: int = 1
    warmup_steps: int = 100
    min_lr_ratio: float = 0.1
    grad_clip: float = 4.0
    z_loss: float = 0.0
    dropout: float = 0.05
    gradient_checkpointing: bool = False
    precision: str = "auto"  # "auto" (bf16 where native: use_bf16), "bf16" or "fp32"
    lora_rank: int = 0  # 0 = full fine-tuning
    lora_alpha: int = 16
    lora_targets: tuple[str, ...] = LORA_TARGETS
    save_every: int = 500
    log_every: int = 10
    eval_every: int = 0  # with held-out tokens: score them every N steps and keep the best step's weights
    seed: int = 0
    max_seq_len: int | None = None  # longer samples are skipped; default: the model's max positions

    def __post_init__(self) -> None:
        if self.lr <= 0 or self.batch_size < 1 or self.grad_accum < 1:
            raise ValueError("lr must be > 0, batch_size and grad_accum >= 1")
        check_precision(self.precision)


@dataclass(frozen=True)
class VQTrainConfig:
    """``pure-lite train-vq`` knobs (vq_train.py).

    The learning rate warms up linearly over ``warmup_steps`` and then follows a cosine to
    ``lr * min_lr_ratio`` (``min_lr_ratio`` 1 keeps it constant, the v1 behaviour). The
    reconstruction loss is ``(1 - l2_weight) * L1 + l2_weight * MSE``: L1 keeps edges, MSE is what
    PSNR measures. Under bf16 (``precision``, see ``use_bf16``) only the encoder's and decoder's
    convolutions run in bf16: the code lookup and the losses stay fp32. ``perceptual_weight`` adds
    LPIPS (VGG16, ``train.perceptual``) to the reconstruction loss; ``decoder_only`` trains the
    decoder of a given tokenizer and leaves its encoder and codebook, hence its codes, as they were.
    """

    steps: int = 2000
    batch_size: int = 8
    crop: int = 64  # training crops, a multiple of 8
    lr: float = 2e-4
    warmup_steps: int = 0
    min_lr_ratio: float = 1.0
    l2_weight: float = 0.0
    beta: float = 0.25  # commitment weight
    disc_weight: float = 0.1
    disc_start: int = 500
    restart_every: int = 20  # re-seed codes unused over this many steps from current encoder outputs
    perceptual_weight: float = 0.0
    decoder_only: bool = False
    seed: int = 0
    log_every: int = 50
    save_every: int = 0  # steps between resumable checkpoints (0: none)
    precision: str = "auto"

    def __post_init__(self) -> None:
        check_precision(self.precision)
        if self.crop % 8:
            raise ValueError(f"crop must be a multiple of 8, got {self.crop}")
        if self.steps < 1 or self.batch_size < 1 or self.lr <= 0:
            raise ValueError("steps and batch_size must be >= 1 and lr > 0")
        if self.perceptual_weight < 0:
            raise ValueError(f"perceptual_weight must be >= 0, got {self.perceptual_weight}")
        if not 0.0 <= self.l2_weight <= 1.0 or not 0.0 < self.min_lr_ratio <= 1.0:
            raise ValueError(f"l2_weight must be in [0, 1] and min_lr_ratio in (0, 1], "
                             f"got {self.l2_weight} and {self.min_lr_ratio}")
