"""Restore one image with the Python API and print what the model perceived.

    python examples/restore.py examples/images/example.png out/restored.png [MODEL_DIR]

Without MODEL_DIR the shipped PURE-tiny demonstration model is used, at its own size (128x128).
"""

import sys

import pure_lite

if __name__ == "__main__":
    src, dst = sys.argv[1:3]
    model = sys.argv[3] if len(sys.argv) > 3 else None
    restorer = pure_lite.Restorer.from_pretrained(model)
    result = restorer.restore(src, seed=0, progress=True)
    result.image.save(dst)
    print("degradation:", result.degradation)
    print("description:", result.description)
    print("mean entropy (nats):", float(result.entropy.mean()))
    print("timings:", {k: round(v, 3) for k, v in result.timings.items()})
