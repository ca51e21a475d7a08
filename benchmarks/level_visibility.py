"""How much of the degradation level the LQ input shows: the ceiling on PURE-tiny's degradation text.

    python benchmarks/level_visibility.py build/pure-tiny    # the recipe's build folder (pack/*.npz); needs scikit-learn

Degrades the training pack's HQ crops (3000 draws) and the held-out pack's (520 draws) with the training
pipeline, describes each 32x32 LQ by a few statistics that track noise, blur and JPEG blocking
(gradient and Laplacian energy, blockiness at 8-px boundaries, chroma detail), fits a gradient-boosted
classifier per type on the training draws and scores the held-out ones, for two labellings:

- ``current``: ``degrade.level_of`` (thirds of the strength scale: two stages combined make most draws
  "large"), what the model is trained and scored on;
- ``tertiles``: thirds of the training draws' strengths, so that guessing one level scores ~33%.

Accuracy near the majority share (current) or near 33% (tertiles) says the level is hardly visible in
the LQ as it reaches the model (which sees it through the VQ, coarser still).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

import report

TYPES = ("noise", "blur", "jpeg")


def features(lq: np.ndarray) -> np.ndarray:
    """(n, 32, 32, 3) uint8 -> (n, 8) statistics."""
    x = lq.astype(np.float32) / 255.0
    g = x.mean(-1)
    dx, dy = np.abs(np.diff(g, axis=-1)), np.abs(np.diff(g, axis=-2))
    lap = 4 * g[..., 1:-1, 1:-1] - g[..., :-2, 1:-1] - g[..., 2:, 1:-1] - g[..., 1:-1, :-2] - g[..., 1:-1, 2:]
    chroma = np.abs(np.diff(x - x.mean(-1, keepdims=True), axis=-2)).mean((-1, -2, -3))
    blocky = dx[..., 7::8].mean((-1, -2)) / (dx.mean((-1, -2)) + 1e-6)
    return np.stack([dx.mean((-1, -2)), dy.mean((-1, -2)), lap.var((-1, -2)), np.median(np.abs(lap), axis=(-1, -2)),
                     x.std((-2, -3)).mean(-1), g.std((-1, -2)), blocky, chroma], -1)


def draws(hq: np.ndarray, n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    from pure_lite.train.degrade import DegradationConfig, degrade

    rng, lq, strength = np.random.default_rng(seed), [], []
    for i in range(n):
        d = degrade(hq[i % len(hq)].astype(np.float32) / 255.0, rng, DegradationConfig(scale=4))
        lq.append((np.clip(d.lq, 0, 1) * 255).round().astype(np.uint8))
        strength.append([d.strengths[t] for t in TYPES])
    return np.stack(lq), np.array(strength)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("build", type=Path, help="the recipe's build folder (pack/train.npz, pack/heldout.npz)")
    args = ap.parse_args()
    from sklearn.ensemble import HistGradientBoostingClassifier

    train_lq, train_s = draws(np.load(args.build / "pack" / "train.npz")["hq"], 3000, 0)
    held_lq, held_s = draws(np.load(args.build / "pack" / "heldout.npz")["hq"], 520, 1)
    x_train, x_held = features(train_lq), features(held_lq)
    results, lines = {}, ["| type | labels | training share small/medium/large | held-out accuracy | "
                          "always the commonest level |", "| --- | --- | --- | --- | --- |"]
    for j, kind in enumerate(TYPES):
        for labels, cuts in (("current", [1 / 3, 2 / 3]), ("tertiles", list(np.quantile(train_s[:, j], [1 / 3, 2 / 3])))):
            y_train, y_held = np.digitize(train_s[:, j], cuts), np.digitize(held_s[:, j], cuts)
            model = HistGradientBoostingClassifier(max_iter=300, random_state=0).fit(x_train, y_train)
            share = np.bincount(y_train, minlength=3) / len(y_train)
            r = {"cuts": [float(c) for c in cuts], "share": share.tolist(),
                 "accuracy": float((model.predict(x_held) == y_held).mean()),
                 "majority": float((y_held == share.argmax()).mean())}
            results[f"{kind}-{labels}"] = r
            lines.append(f"| {kind} | {labels} | {'/'.join(f'{s:.2f}' for s in share)} | {r['accuracy']:.2f} | "
                         f"{r['majority']:.2f} |")
    lines.append("\n3000 training draws, 520 held-out draws (the recipe's packs, degraded anew); a gradient-boosted "
                 "classifier on 8 LQ statistics.")
    report.write("level_visibility", results, "\n".join(lines))


if __name__ == "__main__":
    main()
