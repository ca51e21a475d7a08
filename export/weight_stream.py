"""Fill a traced graph's weights from the checkpoint one tensor at a time, straight into its external-data file.

A graph traced from a stand-in (``stand_in``) has one initializer per parameter and no values. Here
each is traced back to a checkpoint tensor (a ``Source``: the tensor, the rows taken from it, the axes
permuted) and written by ``write_graph``: read in the checkpoint's own dtype, converted (float32, or
the encoders of ``quantize``), appended to ``NAME.onnx.data`` and dropped before the next one. Peak
memory is the largest tensor and its conversions, whatever the size of the model.

Nothing is inferred from names or shapes alone: an initializer's name is the traced module's name
for the parameter, which the stand-in maps to a checkpoint tensor by identity; a Transpose applied to
a weight is read off the graph (its ``perm``) and folded into the stored tensor, as the graph optimizer
folds it for real weights; every shape is checked against the checkpoint before a byte is written;
an initializer that traces to no checkpoint tensor stops the export.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable

import numpy as np

from pure_lite.errors import CheckpointError, PureLiteError

from .tensors import Tensors


class ExportError(PureLiteError, RuntimeError):
    """A traced graph the exporter cannot fill from the checkpoint (an initializer with no checkpoint tensor)."""


@dataclass(frozen=True)
class Source:
    """One initializer's float values: checkpoint tensor ``name``, its ``rows`` in that order, then ``layout``.

    ``layout`` is the layout-only ops the graph applied to the weight and that were folded into the
    stored tensor: ("transpose", perm) and ("reshape", shape), in order.
    """

    name: str
    rows: np.ndarray | None = field(default=None, compare=False)
    layout: tuple[tuple[str, tuple[int, ...]], ...] = ()

    def shape(self, tensors: Tensors) -> tuple[int, ...]:
        shape = tensors.shape(self.name)
        if self.rows is not None:
            shape = (len(self.rows), *shape[1:])
        for op, arg in self.layout:
            shape = tuple(shape[i] for i in arg) if op == "transpose" else arg
        return shape

    def load(self, tensors: Tensors) -> np.ndarray:
        """The values as a C-contiguous float32 array; rows and layout are taken in the stored dtype, then upcast."""
        import torch

        tensor = tensors.read(self.name)
        if self.rows is not None:
            tensor = tensor[torch.from_numpy(np.asarray(self.rows, np.int64))]
        for op, arg in self.layout:
            tensor = tensor.permute(arg) if op == "transpose" else tensor.reshape(arg)
        return tensor.contiguous().to(torch.float32).numpy()


def as_float32(array: np.ndarray) -> list[np.ndarray]:
    return [array]


@dataclass
class Fill:
    """Initializers written from one source: ``encode`` turns its float32 values into one array per value."""

    source: Source
    values: list  # onnx_ir Values, in the order ``encode`` returns their arrays
    encode: Callable[[np.ndarray], list[np.ndarray]] = as_float32


def unload_fake_weights(model) -> int:
    """Clear the initializers that hold the stand-in's fake tensors; returns how many.

    A fake tensor has no data, so the graph optimizer must see these as unknown values (it folds
    nothing into them and removes those no node uses); ``plan_fills`` finds them again by their
    empty value.
    """
    from torch._subclasses.fake_tensor import FakeTensor

    count = 0
    for value in model.graph.initializers.values():
        if isinstance(getattr(value.const_value, "raw", None), FakeTensor):
            value.const_value = None
            count += 1
    return count


def _layout_step(node, value) -> tuple[str, tuple[int, ...]] | None:
    """What a Transpose or an Unsqueeze with constant axes does to ``value``'s layout; None for any other node."""
    if node.domain not in ("", "ai.onnx"):
        return None
    if node.op_type == "Transpose":
        perm = node.attributes.get("perm")
        return "transpose", tuple(perm.as_ints()) if perm is not None else tuple(reversed(range(len(value.shape))))
    if node.op_type == "Unsqueeze" and len(node.inputs) == 2 and node.inputs[1].const_value is not None:
        rank = len(value.shape) + node.inputs[1].const_value.numpy().size
        axes = {int(a) % rank for a in node.inputs[1].const_value.numpy().ravel()}
        dims = iter(value.shape)
        return "reshape", tuple(1 if i in axes else next(dims) for i in range(rank))
    return None


def _fold_layout(graph, value, source: Source) -> Source:
    """Fold the layout-only ops that are a weight's only use into the stored tensor, as constant folding
    does for real weights, so the graph runs no Transpose or Unsqueeze on a weight at every call."""
    while len(value.uses()) == 1:
        node = value.uses()[0].node
        step = _layout_step(node, value)
        out = node.outputs[0]
        if step is None or out.is_graph_output() or value.uses()[0].idx != 0:
            break
        source = replace(source, layout=(*source.layout, step))
        new_shape = step[1] if step[0] == "reshape" else tuple(value.shape[i] for i in step[1])
        if out.shape is not None and tuple(out.shape) != new_shape:
            raise ExportError(f"{value.name}: {node.op_type} to {new_shape} but the graph declares {tuple(out.shape)}")
        operands = node.inputs[1:]
        out.replace_all_uses_with(value)
        graph.remove(node, safe=True)
        for operand in operands:  # Unsqueeze's axes, if nothing else reads them
            if operand is not None and operand.is_initializer() and not operand.uses():
                del graph.initializers[operand.name]
        value.shape = type(value.shape)(new_shape)
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
        declared = tuple(value.shape)
        stored = tensors.shape(source.name)
        if source.shape(tensors) != declared:
            raise CheckpointError(f"tensor {source.name!r} has shape {stored}; the graph needs {declared}")
        source = _fold_layout(graph, value, source)
        fills.append(Fill(source, [value]))
    return fills


def _stored_as(value) -> tuple[np.dtype, int]:
    """NumPy dtype and byte count of an initializer's data (4-bit types are packed two to a byte)."""
    bits = value.dtype.bitwidth
    return (np.dtype(np.uint8) if bits < 8 else np.dtype(value.dtype.numpy()),
            math.ceil(math.prod(value.shape) * bits / 8))


class Progress:
    """One bar over every graph of an export: checkpoint bytes read, with tensors done in the postfix."""

    def __init__(self, tensors: int, nbytes: int, enabled: bool):
        from tqdm.auto import tqdm

        self.tensors, self.done = tensors, 0
        self.bar = tqdm(total=nbytes, unit="B", unit_scale=True, unit_divisor=1024, desc="weights",
                        disable=not enabled, dynamic_ncols=True)

    def update(self, nbytes: int) -> None:
        self.done += 1
        self.bar.set_postfix_str(f"{self.done}/{self.tensors} tensors", refresh=False)
        self.bar.update(nbytes)

    def close(self) -> None:
        self.bar.close()


def write_graph(model, fills: list[Fill], tensors: Tensors, path: Path, progress: Progress) -> None:
    """Write ``path`` and ``path.name + '.data'``: each fill's arrays appended in turn, then the graph referring to them."""
    import onnx_ir as ir

    data = path.name + ".data"
    with open(path.parent / data, "wb") as f:
        for fill in fills:
            arrays = fill.encode(fill.source.load(tensors))
            if len(arrays) != len(fill.values):
                raise ExportError(f"{fill.source.name}: {len(arrays)} arrays for {len(fill.values)} initializers")
            for value, array in zip(fill.values, arrays):
                array = np.ascontiguousarray(array)
                dtype, nbytes = _stored_as(value)
                if array.dtype != dtype or array.nbytes != nbytes:
                    raise ExportError(f"{value.name}: encoded {array.dtype} {array.shape} does not fit "
                                      f"{value.dtype} {tuple(value.shape)}")
                offset = f.tell()
                f.write(array.data.cast("B") if array.ndim else array.tobytes())
                value.const_value = ir.ExternalTensor(data, offset, array.nbytes, value.dtype, shape=value.shape,
                                                      name=value.name, base_dir=path.parent)
            del arrays
            progress.update(tensors.nbytes(fill.source.name))
    ir.save(model, path)
