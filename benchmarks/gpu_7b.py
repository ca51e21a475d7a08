"""GPU benchmark on a 7B-shaped random Chameleon (hidden 4096, 32 layers, 32 heads, vocabulary 73728):
decode steps per second for the reference-style loop (CFG as a second forward, dynamic cache) and
pure-lite's torch backend (CFG as batch 2), in fp16 and with bitsandbytes nf4 weights.

Sized for a few minutes on one H100/H200: random weights are created on the GPU (no checkpoint on
disk), a 1024-token prompt, then --steps image steps per variant.

    python benchmarks/gpu_7b.py [--steps 128]

Not yet run: no GPU machine was lent to the session that wrote it.
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np


def main() -> None:
    import torch
    from transformers import ChameleonConfig, ChameleonForConditionalGeneration, DynamicCache

    from pure_lite.lm import ImageHead, TorchDecoder

    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=128)
    parser.add_argument("--prompt", type=int, default=1024)
    args = parser.parse_args()
    assert torch.cuda.is_available(), "needs a CUDA GPU"
    vocab = {f"<tok{i}>": i for i in range(16)}
    config = ChameleonConfig(vocab_size=73728, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                             num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=8192,
                             vocabulary_map=vocab)
    results = {"device": torch.cuda.get_device_name(), "steps": args.steps, "prompt": args.prompt, "variants": {}}

    def build(quant: str):
        with torch.device("cuda"):
            torch.manual_seed(0)
            model = ChameleonForConditionalGeneration(config).half().eval()
        if quant == "nf4":
            import bitsandbytes as bnb

            for layer in model.model.layers:
                for parent in (layer.self_attn, layer.mlp):
                    for name, child in list(parent.named_children()):
                        if isinstance(child, torch.nn.Linear):
                            q = bnb.nn.Linear4bit(child.in_features, child.out_features, bias=False,
                                                  compute_dtype=torch.float16, quant_type="nf4")
                            q.weight = bnb.nn.Params4bit(child.weight.data.cpu(), requires_grad=False,
                                                         quant_type="nf4").cuda()
                            setattr(parent, name, q)
        model.config._attn_implementation = "sdpa"
        return model

    prompt = np.random.default_rng(0).integers(4, 8196, args.prompt)
    image_ids = np.concatenate([np.arange(4, 8196), np.arange(65536, 73728)])

    def measure(model) -> dict:
        dec = TorchDecoder(model, ImageHead(model, image_ids), "cuda")
        dec.prefill(prompt, capacity=args.prompt + args.steps + 4)
        dec.begin_unconditional()
        torch.cuda.synchronize()
        t = time.perf_counter()
        for i in range(args.steps):
            dec.step(np.array([4 + i % 8192]), image=True)
        torch.cuda.synchronize()
        ours = args.steps / (time.perf_counter() - t)

        @torch.inference_mode()
        def fwd(ids, cache):
            h = model.model(input_ids=torch.tensor([ids], device="cuda"), cache=cache, use_cache=True).last_hidden_state
            return model.lm_head(h[:, -1])

        cond, uncond = DynamicCache(config=config), DynamicCache(config=config)
        fwd(list(prompt), cond)
        fwd([8197], uncond)
        torch.cuda.synchronize()
        t = time.perf_counter()
        for i in range(args.steps):
            fwd([4 + i % 8192], cond)
            fwd([4 + i % 8192], uncond)
        torch.cuda.synchronize()
        ref = args.steps / (time.perf_counter() - t)
        return {"pure_lite_steps_per_s": ours, "reference_steps_per_s": ref,
                "peak_gpu_mem_gb": torch.cuda.max_memory_allocated() / 1e9}

    for quant in ("fp16", "nf4"):
        results["variants"][quant] = measure(build(quant))
        print(quant, results["variants"][quant], flush=True)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    print("RESULT " + json.dumps(results))


if __name__ == "__main__":
    main()
