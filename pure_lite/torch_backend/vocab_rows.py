"""The vocabulary rows a step uses on the device, the whole tables elsewhere (issue 36, part 1).

Inside an image only image ids and a few special ids (the header's image start and grid sizes, the row end)
are fed, and only image ids are scored (``ImageHead`` already holds ``lm_head``'s image rows). PURE's
vocabulary has 73728 ids and 16384 image codes, so the input embedding and ``lm_head`` in bf16 take ~1.2 GB of
which the image phase needs ~0.13 GB of embedding rows (and ImageHead's own copy of the scored rows). Here the
kept embedding rows stay on the device, reached through an id -> row table, and the whole embedding and
``lm_head`` move to ``text_device`` (the CPU): the prefill and the text (a few dozen tokens per tile) gather
their embeddings and compute their logits there. The embeddings are the same values either way; the text
logits are the same function of the same weights, computed by ``text_device``'s matmul.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F


class SplitVocabulary:
    """``image_phase_ids``' rows of the input embedding on ``device``; the whole embedding and ``lm_head`` on
    ``text_device`` (moved there, in place: build this after loading, before anything reads them)."""

    def __init__(self, lm, image_phase_ids: np.ndarray, device, text_device):
        self.device, self.text_device = torch.device(device), torch.device(text_device)
        table = lm.model.embed_tokens.weight
        kept = torch.as_tensor(np.unique(np.asarray(image_phase_ids, np.int64)), device=table.device)
        self.kept = table.detach()[kept].to(self.device)  # (K, hidden)
        # id -> its row in ``kept`` (0 for an id the image phase never feeds: such an id must not come here)
        row = torch.zeros(table.shape[0], dtype=torch.int64, device=table.device)
        row[kept] = torch.arange(len(kept), device=table.device)
        self.row = row.to(self.device)
        lm.model.embed_tokens.to(self.text_device)
        lm.lm_head.to(self.text_device)
        self.table, self.lm_head = lm.model.embed_tokens.weight, lm.lm_head

    def embed_image(self, ids: torch.Tensor) -> torch.Tensor:
        """(R, T) image-phase ids on the device -> their embeddings (R, T, hidden), on the device."""
        return F.embedding(self.row[ids], self.kept)

    def embed_text(self, ids: np.ndarray) -> torch.Tensor:
        """(R, T) ids on the host, any -> their embeddings (R, T, hidden), gathered on ``text_device``, moved."""
        return F.embedding(torch.as_tensor(ids, device=self.text_device), self.table).to(self.device)

    def text_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Final-norm hidden states -> every id's logits (float32), computed on ``text_device``."""
        return self.lm_head(hidden.to(self.text_device).unsqueeze(-2)).squeeze(-2).float()
