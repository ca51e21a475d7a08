"""Fill a traced graph's weights from the checkpoint, a few rows at a time, straight into its external-data file.

A graph traced from a stand-in (``stand_in``) has one initializer per parameter and no values. Here
each is traced back to a checkpoint tensor (a ``Source``: the tensor, the rows taken from it, the
layout ops folded into it) and written by ``write_graph``: read in the checkpoint's own dtype,
converted (float32, or the encoders of ``quantize``), written at its place in ``NAME.onnx.data``
and dropped. Every encoder works row by row of the checkpoint tensor (a MatMulNBits column, a
Gather table row), so a tensor goes through in chunks of ``CHUNK_BYTES``; only a float weight
stored transposed is converted whole. Peak memory is a chunk and its conversions, or the largest
transposed float weight, whatever the number of layers.

Nothing is inferred from names or shapes alone: an initializer's name is the traced module's name
for the parameter, which the stand-in maps to a checkpoint tensor by identity; a Transpose or an
Unsqueeze applied to a weight is read off the graph and folded into the stored tensor, as the graph
optimizer folds it for real weights; every shape is checked against the checkpoint before a byte
is written; an initializer that traces to no checkpoint tensor stops the export.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable

import numpy as np

from pure_lite.errors import CheckpointError, PureLiteError

from .tensors import Tensors

CHUNK_BYTES = 64 << 20  # checkpoint bytes read at a time (more for a float weight stored transposed)


class ExportError(PureLiteError, RuntimeError):
    """A traced graph the exporter cannot fill from the checkpoint (an initializer with no checkpoint tensor)."""


@dataclass(frozen=True)
class Source:
    """One initializer's float values: checkpoint tensor ``name``, its ``rows`` in that order, then ``layout``.

    ``layout`` holds the layout-only ops of the graph folded into the stored tensor, in order:
    ("transpose", perm) and ("unsqueeze", axes).
    """

    name: str
    rows: np.ndarray | None = field(default=None, compare=False)
    layout: tuple[tuple[str, tuple[int, ...]], ...] = ()

    def count(self, tensors: Tensors) -> int:
        """Rows of the source (of the checkpoint tensor, or selected from it); 1 for a scalar."""
        if self.rows is not None:
            return len(self.rows)
        shape = tensors.shape(self.name)
        return shape[0] if shape else 1

    def shape(self, tensors: Tensors) -> tuple[int, ...]:
        shape = (self.count(tensors), *tensors.shape(self.name)[1:]) if tensors.shape(self.name) else ()
        for op, arg in self.layout:
            shape = tuple(shape[i] for i in arg) if op == "transpose" else _unsqueezed(shape, arg)
        return shape

    def nbytes(self, tensors: Tensors) -> int:
        """Checkpoint bytes read for this source."""
        shape = tensors.shape(self.name)
        return tensors.nbytes(self.name) * self.count(tensors) // shape[0] if shape and shape[0] else \
            tensors.nbytes(self.name)

    def rows_axis(self, tensors: Tensors) -> int:
        """Axis of the stored tensor along which the source's rows run."""
        axes: list[int | None] = list(range(len(tensors.shape(self.name))))  # follow each source axis
        for op, arg in self.layout:
            if op == "transpose":
                axes = [axes[i] for i in arg]
            else:
                for axis in arg:
                    axes.insert(axis, None)
        return axes.index(0)

    def load(self, tensors: Tensors, start: int, stop: int) -> np.ndarray:
        """Source rows ``start:stop`` in the stored layout, as a C-contiguous float32 array.

        Read ``CHUNK_BYTES`` at a time; each piece is laid out and upcast on its own, so a whole
        transposed weight costs its float32 copy and one piece, not the copies of every step.
        """
        step = _rows_per_chunk(tensors, self.name)
        if stop - start <= step:
            return self._piece(tensors, start, stop)
        axis = self.rows_axis(tensors)
        shape = list(self.shape(tensors))
        shape[axis] = stop - start
        out = np.empty(shape, np.float32)
        rows = np.moveaxis(out, axis, 0)  # a view: assigning to it fills ``out``
        for first in range(start, stop, step):
            last = min(first + step, stop)
            rows[first - start:last - start] = np.moveaxis(self._piece(tensors, first, last), axis, 0)
        return out

    def _piece(self, tensors: Tensors, start: int, stop: int) -> np.ndarray:
        import torch

        if not tensors.shape(self.name):
            tensor = tensors.read(self.name)
        elif self.rows is None:
            tensor = tensors.read(self.name, start, stop)
        else:
            wanted = np.asarray(self.rows[start:stop], np.int64)
            breaks = np.flatnonzero(np.diff(wanted) != 1) + 1  # read each run of consecutive rows once
            tensor = torch.cat([tensors.read(self.name, int(run[0]), int(run[-1]) + 1)
                                for run in np.split(wanted, breaks)])
        for op, arg in self.layout:
            if op == "transpose":
                tensor = tensor.permute(arg)
            else:
                for axis in arg:
                    tensor = tensor.unsqueeze(axis)
        return tensor.contiguous().to(torch.float32).numpy()


def _unsqueezed(shape: tuple[int, ...], axes: tuple[int, ...]) -> tuple[int, ...]:
    out = list(shape)
    for axis in axes:  # ascending positions in the result
        out.insert(axis, 1)
    return tuple(out)


def as_float32(array: np.ndarray) -> list[np.ndarray]:
    return [array]


@dataclass
class Fill:
    """Initializers written from one source: ``encode`` turns its float32 values into one array per value.

    ``chunk_axis`` is the axis of the stored tensor that ``encode`` keeps separate (its outputs'
    first axis follows it): chunks of source rows along that axis encode independently. Where the
    source's rows run along another axis, or ``chunk_axis`` is None, the tensor is encoded whole.
    """

    source: Source
    values: list  # onnx_ir Values, in the order ``encode`` returns their arrays
    encode: Callable[[np.ndarray], list[np.ndarray]] = as_float32
    chunk_axis: int | None = 0


def unload_fake_weights(model) -> None:
    """Clear the initializers that hold the stand-in's fake tensors.

    A fake tensor has no data, so the graph optimizer must see these as unknown values (it folds
    nothing into them and removes those no node uses); ``plan_fills`` finds them by their empty value.
    """
    from torch._subclasses.fake_tensor import FakeTensor

    for value in model.graph.initializers.values():
        if isinstance(getattr(value.const_value, "raw", None), FakeTensor):
            value.const_value = None


def _layout_step(node, value) -> tuple[str, tuple[int, ...]] | None:
    """What a Transpose, or an Unsqueeze with constant axes, does to ``value``; None for any other node."""
    if node.domain not in ("", "ai.onnx"):
        return None
    if node.op_type == "Transpose":
        perm = node.attributes.get("perm")
        return "transpose", tuple(perm.as_ints()) if perm is not None else tuple(reversed(range(len(value.shape))))
    if node.op_type == "Unsqueeze" and len(node.inputs) == 2 and node.inputs[1].const_value is not None:
        axes = node.inputs[1].const_value.numpy().ravel()
        rank = len(value.shape) + axes.size
        return "unsqueeze", tuple(sorted(int(a) % rank for a in axes))
    return None


def _fold_layout(graph, value, source: Source) -> Source:
    """Fold the layout-only ops that are a weight's only use into the stored tensor, as constant folding
    does for real weights, so the graph does not transpose or reshape a weight at every call."""
    while len(value.uses()) == 1 and value.uses()[0].idx == 0:
        node = value.uses()[0].node
        step = _layout_step(node, value)
        out = node.outputs[0]
        if step is None or out.is_graph_output():
            break
        dims = tuple(value.shape)
        shape = tuple(dims[i] for i in step[1]) if step[0] == "transpose" else _unsqueezed(dims, step[1])
        if out.shape is not None and tuple(out.shape) != shape:
            raise ExportError(f"{value.name}: {node.op_type} gives {shape} but the graph declares {tuple(out.shape)}")
        operands = node.inputs[1:]
        out.replace_all_uses_with(value)
        graph.remove(node, safe=True)
        for operand in operands:  # Unsqueeze's axes, if nothing else reads them
            if operand is not None and operand.is_initializer() and not operand.uses():
                del graph.initializers[operand.name]
        value.shape = type(value.shape)(shape)
        source = replace(source, layout=(*source.layout, step))
    return source


def plan_fills(model, sources: dict[str, Source], tensors: Tensors) -> list[Fill]:
    """One ``Fill`` per empty initializer of ``model``, in graph order; folds their layout ops; checks every shape."""
    graph = model.graph
    fills = []
    for value in list(graph.initializers.values()):
        if value.const_value is not None:
            continue
        source = sources.get(value.name)
        if source is None:
            raise ExportError(f"{graph.name or 'graph'}: initializer {value.name!r} traces to no checkpoint tensor")
        if source.shape(tensors) != tuple(value.shape):
            raise CheckpointError(f"tensor {source.name!r} gives shape {source.shape(tensors)}; "
                                  f"the graph needs {tuple(value.shape)}")
        fills.append(Fill(_fold_layout(graph, value, source), [value]))
    return fills


def _stored_as(value) -> tuple[np.dtype, int]:
    """NumPy dtype and byte count of an initializer's data (4-bit types are packed two to a byte)."""
    bits = value.dtype.bitwidth
    return (np.dtype(np.uint8) if bits < 8 else np.dtype(value.dtype.numpy()),
            math.ceil(math.prod(value.shape) * bits / 8))


def _rows_per_chunk(tensors: Tensors, name: str) -> int:
    """Rows of ``name`` in about ``CHUNK_BYTES``; even, so 4-bit packing pairs never straddle two chunks."""
    shape = tensors.shape(name)
    row_bytes = max(1, tensors.nbytes(name) // shape[0]) if shape and shape[0] else 1
    return max(2, CHUNK_BYTES // row_bytes // 2 * 2)


def _chunks(fill: Fill, tensors: Tensors) -> list[tuple[int, int]]:
    """Ranges of source rows to encode at a time: all at once unless ``encode`` keeps the rows' axis separate."""
    count = fill.source.count(tensors)
    separable = fill.chunk_axis is not None and tensors.shape(fill.source.name)
    if not separable or fill.source.rows_axis(tensors) != fill.chunk_axis:
        return [(0, count)]
    step = _rows_per_chunk(tensors, fill.source.name)
    return [(start, min(start + step, count)) for start in range(0, count, step)]


class Progress:
    """One bar over every graph of an export: checkpoint bytes read, with tensors done in the postfix;
    or, given ``say``, "i/n tensors" messages to a caller's own display (the command line's stage bar)."""

    def __init__(self, tensors: int, nbytes: int, enabled: bool, say: Callable[[str], None] | None = None):
        from tqdm.auto import tqdm

        self.tensors, self.done, self.say = tensors, 0, say
        self.bar = tqdm(total=nbytes, unit="B", unit_scale=True, unit_divisor=1024, desc="weights",
                        disable=not enabled, dynamic_ncols=True)

    def update(self, nbytes: int, tensor_done: bool) -> None:
        self.done += tensor_done
        if tensor_done and self.say is not None:
            self.say(f"{self.done}/{self.tensors} tensors")
        self.bar.set_postfix_str(f"{self.done}/{self.tensors} tensors", refresh=False)
        self.bar.update(nbytes)

    def close(self) -> None:
        self.bar.close()


def write_graph(model, fills: list[Fill], tensors: Tensors, path: Path, progress: Progress) -> None:
    """Write ``path`` and ``path.name + '.data'``: each initializer's bytes at its place, then the graph."""
    import onnx_ir as ir

    data = path.name + ".data"
    with open(path.parent / data, "wb") as f:
        end = 0
        for fill in fills:
            slots = [(value, *_stored_as(value)) for value in fill.values]
            offsets = [end + sum(nbytes for _, _, nbytes in slots[:i]) for i in range(len(slots))]
            written = [0] * len(slots)
            chunks = _chunks(fill, tensors)
            count, source_bytes = fill.source.count(tensors), fill.source.nbytes(tensors)
            for start, stop in chunks:
                arrays = fill.encode(fill.source.load(tensors, start, stop))
                if len(arrays) != len(slots):
                    raise ExportError(f"{fill.source.name}: {len(arrays)} arrays for {len(slots)} initializers")
                for i, ((value, dtype, nbytes), array) in enumerate(zip(slots, arrays)):
                    array = np.ascontiguousarray(array)
                    if array.dtype != dtype or written[i] + array.nbytes > nbytes:
                        raise ExportError(f"{value.name}: encoded {array.dtype} {array.shape} does not fit "
                                          f"{value.dtype} {tuple(value.shape)}")
                    os.pwrite(f.fileno(), array.data.cast("B") if array.ndim else array.tobytes(),
                              offsets[i] + written[i])
                    written[i] += array.nbytes
                del arrays
                progress.update(source_bytes * (stop - start) // max(1, count), tensor_done=stop == count)
            for (value, _, nbytes), offset, done in zip(slots, offsets, written):
                if done != nbytes:
                    raise ExportError(f"{value.name}: {done} of its {nbytes} bytes were encoded")
                value.const_value = ir.ExternalTensor(data, offset, nbytes, value.dtype, shape=value.shape,
                                                      name=value.name, base_dir=path.parent)
            end += sum(nbytes for _, _, nbytes in slots)
    ir.save(model, path)
