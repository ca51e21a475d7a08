"""Photos of any size and shape: the model's square tiles over the output, and blending them back.

PURE restores one square of its own size (512 px; PURE-tiny 128 px). A photo restored at a
scale is covered by such squares on its output grid, overlapping by at least a quarter of
a tile; each is restored from the matching region of the input, and the results are
averaged with weights that fall off linearly towards each tile's inner edges, so no seam
shows where tiles meet. An output smaller than one tile along a side is stretched to a
tile there and the result resized back.

Memory stays bounded by the tiles in flight plus the output canvas: the input is never
upsampled as a whole; each tile's region is resized on its own (Pillow's box resize reads
the pixels around the box, so neighbouring tiles agree).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from PIL import Image

from .images import resize

DEFAULT_TILE_BATCH = 4  # tiles decoded together (docs/benchmarks.md, "Tiles")
# 64 Mpx: an 8192 x 8192 output, whose canvas (RGB + weight, float32) takes 1 GiB.
MAX_OUTPUT_PIXELS = 64 * 1024 * 1024


def axis_starts(length: int, tile: int, min_overlap: int) -> list[int]:
    """Start offsets of tiles covering [0, length), evenly spread, neighbours overlapping >= min_overlap."""
    if length <= tile:
        return [0]
    count = math.ceil((length - min_overlap) / (tile - min_overlap))
    return [round(i * (length - tile) / (count - 1)) for i in range(count)]


def ramp(tile: int, overlap: int) -> np.ndarray:
    """1-D blending weight: rises linearly over ``overlap`` pixels at both ends, 1 in between, never 0."""
    i = np.arange(tile, dtype=np.float32) + 0.5
    return np.minimum(1.0, np.minimum(i, tile - i) / max(overlap, 1)).astype(np.float32)


@dataclass(frozen=True)
class TilePlan:
    """Where the tiles of one output lie; boxes are (left, top, right, bottom) on the canvas."""

    output: tuple[int, int]  # (width, height) returned to the user
    canvas: tuple[int, int]  # (width, height) tiled: the output, each side at least one tile
    tile: int
    boxes: tuple[tuple[int, int, int, int], ...]

    @classmethod
    def cover(cls, width: int, height: int, tile: int) -> "TilePlan":
        canvas = (max(width, tile), max(height, tile))
        overlap = tile // 4
        boxes = tuple((x, y, x + tile, y + tile) for y in axis_starts(canvas[1], tile, overlap)
                      for x in axis_starts(canvas[0], tile, overlap))
        return cls(output=(width, height), canvas=canvas, tile=tile, boxes=boxes)

    def output_box(self, box: tuple[int, int, int, int]) -> tuple[int, int, int, int]:
        """A canvas box in output pixels (they differ only where the canvas was stretched)."""
        sx, sy = self.output[0] / self.canvas[0], self.output[1] / self.canvas[1]
        return (round(box[0] * sx), round(box[1] * sy), round(box[2] * sx), round(box[3] * sy))


def input_region(image: np.ndarray, plan: TilePlan, box: tuple[int, int, int, int]) -> np.ndarray:
    """The tile's square, bicubic-resized from the matching region of the input (float RGB in [0, 1])."""
    h, w = image.shape[:2]
    sx, sy = w / plan.canvas[0], h / plan.canvas[1]
    source = (box[0] * sx, box[1] * sy, box[2] * sx, box[3] * sy)
    size = (box[2] - box[0], box[3] - box[1])
    channels = [np.asarray(Image.fromarray(np.ascontiguousarray(image[..., c]), mode="F").resize(
        size, Image.BICUBIC, box=source)) for c in range(3)]
    return np.clip(np.stack(channels, axis=2), 0, 1).astype(np.float32)


class Canvas:
    """Weighted sum of restored tiles (and of their entropy maps, at 1/8 resolution)."""

    def __init__(self, plan: TilePlan, stride: int):
        w, h = plan.canvas
        self.plan, self.stride = plan, stride
        self.pixels = np.zeros((h, w, 3), np.float32)
        self.weight = np.zeros((h, w, 1), np.float32)
        weight_1d = ramp(plan.tile, plan.tile // 4)
        self.tile_weight = np.outer(weight_1d, weight_1d)[..., None]
        self.entropy = np.zeros((math.ceil(h / stride), math.ceil(w / stride)), np.float32)
        self.entropy_weight = np.zeros_like(self.entropy)
        self.code_weight = self.tile_weight[stride // 2::stride, stride // 2::stride, 0]

    def add(self, box: tuple[int, int, int, int], pixels: np.ndarray, entropy: np.ndarray) -> None:
        x0, y0, x1, y1 = box
        self.pixels[y0:y1, x0:x1] += pixels * self.tile_weight
        self.weight[y0:y1, x0:x1] += self.tile_weight
        ey, ex = round(y0 / self.stride), round(x0 / self.stride)
        eh, ew = entropy.shape
        target = self.entropy[ey:ey + eh, ex:ex + ew]
        rows, cols = target.shape  # a rounded offset may push the last code past the edge
        target += (entropy * self.code_weight)[:rows, :cols]
        self.entropy_weight[ey:ey + eh, ex:ex + ew] += self.code_weight[:rows, :cols]

    def result(self) -> tuple[np.ndarray, np.ndarray]:
        """(output pixels H x W x 3 in [0, 1], entropy map at 1/stride of the output)."""
        pixels = self.pixels / np.maximum(self.weight, 1e-12)
        entropy = self.entropy / np.maximum(self.entropy_weight, 1e-12)
        out_w, out_h = self.plan.output
        if self.plan.canvas != self.plan.output:
            pixels = resize(pixels, out_w, out_h)
            ew, eh = max(1, math.ceil(out_w / self.stride)), max(1, math.ceil(out_h / self.stride))
            entropy = np.asarray(Image.fromarray(entropy, mode="F").resize((ew, eh), Image.BILINEAR))
        return np.clip(pixels, 0, 1).astype(np.float32), entropy.astype(np.float32)
