"""How many kernels a call into a ``TorchDecoder`` launches: the measure the decode step is trimmed by.

Inside a CUDA graph a step's time beyond its memory traffic goes to its kernels, one launch slot each,
so the layer forwards are compared by their count (``benchmarks/step_ops.py`` reports it,
``tests/test_torch_layers.py`` bounds it). Counted on any device, CPU included: aten calls seen by a
``TorchDispatchMode``, less those that launch nothing (views, allocations), plus each launch of
``pure_lite.torch_backend.fused_kernels``, which the dispatcher does not see (under the interpreter its kernels run
as torch calls of their own, which are not counted).
"""

from __future__ import annotations

import collections
import types
from typing import Callable

NO_KERNEL = frozenset({
    "view", "_unsafe_view", "transpose", "slice", "select", "unsqueeze", "squeeze", "expand", "permute", "t", "alias",
    "detach", "as_strided", "split", "unbind", "reshape", "unflatten", "flatten", "lift_fresh", "split_with_sizes",
    "_reshape_alias", "chunk",
    "empty", "empty_like", "new_empty", "empty_strided",  # the Triton wrappers allocate their outputs
})
LAYER_KERNELS = ("add_rms_norm", "qk_norm_rope_store", "swiglu")  # one launch each, called through layers.triton
ATTENTION_LAUNCHES = 2  # int8_attention: the split kernel and the combine kernel


def count_kernels(decoder, call: Callable[[], object]) -> collections.Counter:
    """Run ``call()`` and return the kernels it launched through ``decoder``, by aten op or Triton kernel name.

    The decoder's Triton entry points are wrapped for the call and put back afterwards.
    """
    from torch.utils._python_dispatch import TorchDispatchMode, _disable_current_modes

    counts = collections.Counter()

    class Count(TorchDispatchMode):
        def __torch_dispatch__(self, func, types_, args=(), kwargs=None):
            name = func.overloadpacket.__name__
            if name not in NO_KERNEL:
                counts[name] += 1
            return func(*args, **(kwargs or {}))

    def counted(name: str, function: Callable, launches: int = 1) -> Callable:
        def launch(*args, **kwargs):
            counts[name] += launches
            with _disable_current_modes():
                return function(*args, **kwargs)
        return launch

    layers, kv = decoder.layers_fn, decoder.kv
    module, attention = getattr(layers, "triton", None), kv.int8_attention
    try:
        if module is not None:
            layers.triton = types.SimpleNamespace(**{n: counted(n, getattr(module, n)) for n in LAYER_KERNELS})
        if attention is not None:
            kv.int8_attention = counted("int8_attention", attention, ATTENTION_LAUNCHES)
        with Count():
            call()
    finally:
        if module is not None:
            layers.triton = module
        kv.int8_attention = attention
    return counts
