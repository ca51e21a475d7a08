"""The torch backend's KV-cache decoding (TorchDecoder: grouped static cache, batch-2 CFG) against full
recomputation by a second copy of the model with transformers' own attention (eager and SDPA), and its
chained on-device image loop against the shared host loop."""

import numpy as np
import pytest
import torch
from conftest import TARGET

from pure_lite.checkpoint import CheckpointFiles
from pure_lite.generate import generate
from pure_lite.prompt import TextTokenizer, prompt_ids
from pure_lite.sampling import SamplingConfig
from pure_lite.tokens import TokenLayout
from pure_lite.torch_backend.chameleon import ImageHead, load_language_model
from pure_lite.torch_backend.decoder import TorchDecoder


class RecomputeDecoder:
    """No cache at all: every call runs each row's whole sequence through ``lm.model``."""

    def __init__(self, lm, layout):
        self.lm, self.layout = lm, layout

    @torch.no_grad()
    def _logits(self, seq, last):
        hidden = self.lm.model(input_ids=torch.tensor([seq]), use_cache=False).last_hidden_state
        return self.lm.lm_head(hidden[0, -last:]).float().numpy()  # (last, V)

    def prefill(self, prompts, capacity, max_step, unconditional_capacity=None):
        self.seqs = [list(p) for p in prompts]
        self.batch = len(prompts)
        return np.stack([self._logits(s, 1)[-1] for s in self.seqs])

    def begin_unconditional(self):
        self.seqs += [[] for _ in range(self.batch)]

    def step(self, ids, image=False, all_positions=False):
        ids = np.asarray(ids)
        for s, row in zip(self.seqs, ids):
            s.extend(int(i) for i in row)
        logits = np.stack([self._logits(s, ids.shape[1]) for s in self.seqs])  # (rows, T, V)
        logits = logits if all_positions else logits[:, -1]
        return self.layout.image_logits(logits) if image else logits

    def rewind(self, counts):
        for s, n in zip(self.seqs, counts):
            del s[len(s) - int(n):]


@pytest.fixture(scope="module", params=["eager", "sdpa"])
def loaded(tiny_checkpoint, request):
    files = CheckpointFiles.locate(tiny_checkpoint)
    config = files.read_config()
    layout = TokenLayout.from_tokenizer_file(files.tokenizer, config["vocab_size"])
    lm = load_language_model(files)  # TorchDecoder switches it to its grouped-cache attention
    reference = load_language_model(files, attn_implementation=request.param)
    prompt = prompt_ids(TextTokenizer(files.tokenizer), layout,
                        layout.encode_image(np.arange(64).reshape(8, 8) % layout.codebook_size))
    return lm, reference, layout, prompt


@pytest.mark.parametrize("cfg_scale", [1.0, 0.8, 3.0])
def test_kv_cache_equals_full_recompute_greedy(loaded, cfg_scale):
    lm, reference, layout, prompt = loaded
    config = SamplingConfig(temperature=0.0, cfg_scale=cfg_scale, max_text_tokens=6)
    runs = [
        generate(dec, prompt, layout, TARGET, config, np.random.default_rng(0), max_positions=4096)
        for dec in (TorchDecoder(lm, ImageHead(lm, layout.image_ids)), RecomputeDecoder(reference, layout))
    ]
    np.testing.assert_array_equal(runs[0].tokens, runs[1].tokens)
    np.testing.assert_allclose(runs[0].entropy, runs[1].entropy, rtol=1e-4, atol=1e-4)


def test_step_logits_match_recompute(loaded):
    lm, reference, layout, prompt = loaded
    a, b = TorchDecoder(lm, ImageHead(lm, layout.image_ids)), RecomputeDecoder(reference, layout)
    np.testing.assert_allclose(a.prefill([prompt], len(prompt) + 16, 3), b.prefill([prompt], 0, 0),
                               atol=1e-4, rtol=1e-4)
    a.begin_unconditional(), b.begin_unconditional()
    for ids, image in ((layout.header(TARGET, TARGET), True), (layout.image_ids[[3]], False),
                       (layout.image_ids[[5, 7]], True)):
        ids = np.stack([ids, ids])
        np.testing.assert_allclose(a.step(ids, image, all_positions=True), b.step(ids, image, all_positions=True),
                                   atol=1e-4, rtol=1e-4)


def test_cache_keyword_follows_the_layer_signature():
    """transformers 5.0/5.17 layers read ``past_key_values=``, 5.24 ``cache=``; other layers are refused."""
    from transformers.models.chameleon.modeling_chameleon import ChameleonDecoderLayer

    from pure_lite.errors import MissingDependencyError
    from pure_lite.torch_backend.chameleon import _cache_keyword

    class Older:
        def forward(self, hidden_states, attention_mask=None, past_key_values=None, **kwargs): ...

    class Unknown:
        def forward(self, hidden_states, **kwargs): ...

    assert _cache_keyword(Older) == "past_key_values"
    assert _cache_keyword(ChameleonDecoderLayer) in ("cache", "past_key_values")
    with pytest.raises(MissingDependencyError):
        _cache_keyword(Unknown)
