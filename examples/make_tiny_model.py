"""Write a tiny random PURE checkpoint (released layout, random weights) for trying the pipeline.

    python examples/make_tiny_model.py models/tiny
"""

import sys

from pure_lite.testing import make_tiny_checkpoint

if __name__ == "__main__":
    out = sys.argv[1] if len(sys.argv) > 1 else "models/tiny"
    print(f"wrote {make_tiny_checkpoint(out, seed=0, layout='pure')} (random weights: output is noise, not a restoration)")
