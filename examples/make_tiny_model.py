"""Write a tiny random PURE checkpoint (released layout, random weights) for trying the pipeline.

    python examples/make_tiny_model.py models/tiny

Its config.json records the side it "restores" (``pure_lite_image_size``, 128 like PURE-tiny), as a
model trained by pure-lite does: without it a checkpoint is taken to be PURE's 512, and each tile of
a restoration would be a 4164-token image block, past the positions this toy model has (slow, and
gigabytes of memory for a thumbnail). Its export inherits the side (``pure-lite export``).
"""

import json
import sys
from pathlib import Path

from pure_lite.checkpoint import CONFIG_FILE, IMAGE_SIZE_KEY
from pure_lite.testing import make_tiny_checkpoint

IMAGE_SIZE = 128  # tiles of 16 x 16 codes: a 276-token image block

if __name__ == "__main__":
    out = make_tiny_checkpoint(sys.argv[1] if len(sys.argv) > 1 else "models/tiny", seed=0, layout="pure")
    config = json.loads((Path(out) / CONFIG_FILE).read_text())
    (Path(out) / CONFIG_FILE).write_text(json.dumps({**config, IMAGE_SIZE_KEY: IMAGE_SIZE}, indent=2))
    print(f"wrote {out}: random weights, restoring {IMAGE_SIZE}x{IMAGE_SIZE} tiles (output is noise, not a restoration)")
