"""Restore one image with the Python API and print what PURE perceived.

    python examples/restore.py MODEL_DIR examples/images/example.png out/restored.png [TARGET_SIZE]
"""

import sys

import pure_lite

if __name__ == "__main__":
    model, src, dst = sys.argv[1:4]
    size = int(sys.argv[4]) if len(sys.argv) > 4 else 512
    restorer = pure_lite.Restorer.from_pretrained(model)
    result = restorer.restore(src, seed=0, target_size=size, progress=True,
                              sampling=pure_lite.SamplingConfig(max_text_tokens=64))
    result.image.save(dst)
    print("degradation:", result.degradation)
    print("description:", result.description)
    print("mean entropy (nats):", float(result.entropy.mean()))
    print("timings:", {k: round(v, 3) for k, v in result.timings.items()})
