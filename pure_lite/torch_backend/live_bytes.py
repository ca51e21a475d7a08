"""The most bytes of tensors a function holds alive at once, traced without computing anything.

The memory plan needs the VQ codec's working memory for a tile (its decoder holds several full-resolution
feature maps at once, ~0.8 GB in float32 for a 512² tile, and its mid-block attention a (h·w)² matrix):
more than a formula of the widths says reliably, since which step peaks depends on the architecture. So
the plan runs the codec on the meta device (shapes only, no arithmetic, no memory) and counts every
operation's output storage from the moment it is made until it is freed. On a GPU the allocator adds its
rounding and cuDNN its workspaces, which the plan's reserve covers and the GPU benchmark measures.
"""

from __future__ import annotations

import weakref

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves


class LiveBytes(TorchDispatchMode):
    """Inside ``with LiveBytes() as live:``, ``live.peak`` is the most bytes of storages made inside the block
    that were alive at once (inputs made before the block are not counted; views of a storage count once)."""

    def __init__(self):
        super().__init__()
        self.live = self.peak = 0
        self._held: set[int] = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for tensor in tree_leaves(out):
            if isinstance(tensor, torch.Tensor):
                storage = tensor.untyped_storage()
                key, size = id(storage), storage.nbytes()
                if key in self._held or size == 0:
                    continue
                self._held.add(key)
                self.live += size
                self.peak = max(self.peak, self.live)
                weakref.finalize(storage, self._release, key, size)
        return out

    def _release(self, key: int, size: int) -> None:
        self._held.discard(key)
        self.live -= size
