"""A trained PURE-tiny language model's loss on conversations it trained on against conversations of
held-out photos: how far it memorised rather than learned (pack_train logs only the training loss).

    python benchmarks/lm_heldout.py build/pure-tiny MODEL [--work build/pure-tiny/v2/work] [--n 256]

MODEL is a trained folder (pack_train's OUT/model). The held-out conversations are made from
BUILD/pack/heldout.npz by pack_train's own tokens stage (with MODEL's VQ and tokenizer), the
training ones are the first ``--n`` of WORK/tokens. Reported per supervised token (the degradation
sentence and the HQ image block), in nats, and split into text and image tokens.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np
import report


def losses(lm, dataset, indices, image_ids: np.ndarray, batch: int = 8) -> dict:
    """Mean loss per supervised token over ``dataset[indices]``: all, image codes, and text."""
    import torch

    from pure_lite.train.finetune import CausalLMLoss, collate

    scorer = CausalLMLoss(lm, 0.0)
    totals = {"all": [0.0, 0], "image": [0.0, 0], "text": [0.0, 0]}
    image = torch.as_tensor(np.array(image_ids))
    for start in range(0, len(indices), batch):
        b = collate([dataset[i] for i in indices[start:start + batch]], pad_id=0)
        with torch.no_grad():
            nll, target = scorer.token_losses(b["input_ids"], b["attention_mask"], b["labels"])
        kept = target != -100
        is_image = torch.isin(target, image) & kept
        for name, mask in (("all", kept), ("image", is_image), ("text", kept & ~is_image)):
            totals[name][0] += float(nll[mask].sum())
            totals[name][1] += int(mask.sum())
    return {name: s / max(n, 1) for name, (s, n) in totals.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("build", type=Path)
    parser.add_argument("model", type=Path)
    parser.add_argument("--work", type=Path, help="the run's work folder with tokens/ (default: BUILD/v2/work)")
    parser.add_argument("--n", type=int, default=256, help="conversations of each kind (default: 256)")
    args = parser.parse_args()

    from pure_lite.checkpoint import CheckpointFiles
    from pure_lite.tokens import TokenLayout
    from pure_lite.torch_backend.chameleon import load_language_model
    from pure_lite.train.pack import load_pack
    from pure_lite.train.pack_train import PackTrainConfig, stage_tokens
    from pure_lite.train.pretokenize import TokenDataset

    files = CheckpointFiles.locate(args.model)
    layout = TokenLayout.from_tokenizer_file(files.tokenizer, files.read_config()["vocab_size"])
    lm = load_language_model(files).eval()
    train = TokenDataset((args.work or args.build / "v2" / "work") / "tokens")
    with tempfile.TemporaryDirectory() as tmp:
        held_dir = stage_tokens(load_pack(args.build / "pack" / "heldout.npz"), args.model, Path(tmp),
                                PackTrainConfig(), "cpu", print)
        held = TokenDataset(held_dir)
        rng = np.random.default_rng(0)
        pick = lambda d: sorted(rng.choice(len(d), min(args.n, len(d)), replace=False).tolist())  # noqa: E731
        results = {"model": str(args.model), "train": losses(lm, train, pick(train), layout.image_ids),
                   "heldout": losses(lm, held, pick(held), layout.image_ids),
                   "conversations": {"train": len(train), "heldout": len(held)}, "n": args.n}
    rows = ["| conversations | all supervised tokens | image tokens | degradation text |", "| --- | --- | --- | --- |"]
    for kind in ("train", "heldout"):
        r = results[kind]
        rows.append(f"| {kind} ({min(args.n, results['conversations'][kind])} of {results['conversations'][kind]}) "
                    f"| {r['all']:.3f} | {r['image']:.3f} | {r['text']:.3f} |")
    table = (f"Mean cross-entropy (nats per token) of `{args.model.name}` on conversations it trained on and on "
             "conversations of held-out photos, made the same way.\n\n" + "\n".join(rows))
    report.write("lm_heldout", results, table)


if __name__ == "__main__":
    main()
