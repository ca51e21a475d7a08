"""The GPU decode engine on a random Chameleon of PURE's released 7B shape (hidden 4096, 32 layers,
vocabulary 73728), side by side in one run on one CUDA GPU.

Every variant decodes after the same 4,200-token prompt (a 512² restoration's LQ block and text),
with PURE's default sampling (CFG 0.8 as batch 2, entropy top-k, temperature 0.9):

- ``graphs-b512-transformers``: the captured steps (below) with transformers' own Chameleon layers
  (``layers="transformers"``), and ``graphs-b512-unjoined`` with ``pure_lite.torch_backend.layers`` before
  ``fuse_projections`` joins the projections: the baselines of the layer forward every other variant
  uses (the torch backend's: own layers, projections joined; ``benchmarks/step_ops.py`` counts their
  kernels);
- ``eager-host``: TorchDecoder without graphs, the NumPy sampler on the host (a host round trip per step);
- ``eager-chained``: the sampler on the device, steps chained without a host round trip, no graphs;
- ``graphs-bN``: the chained steps captured as CUDA graphs, attention over spans rounded up to N slots
  (``full``: the whole preallocated capacity, one shape per step width); ``graphs-b512-efficient`` /
  ``-cudnn`` / ``-math``: the same with SDPA held to one kernel (the default picks cuDNN on an H200);
- ``graphs-b512-triton``: the same with ``layers="triton"`` (``pure_lite.torch_backend.fused_kernels``: 11 kernels per
  layer instead of 21); not yet the torch backend's default, this row decides it (also for torchao int4);
  ``...-kv8`` / ``...-kv8-triton``: the int8 KV cache, dequantized for SDPA / read by the Triton attention;
- ``nf4-...``: the same with bitsandbytes nf4 weights (when bitsandbytes is installed);
- ``torchao-int4-...`` / ``torchao-int8-...``: torchao weight-only int4 (the torch backend's
  ``quantize_int4``: tinygemm layout, bf16 activations, group 128) and int8 (per row) weights, when
  torchao is installed;
- ``...-4-tiles``: four restorations decoded together (8 rows per step): ms per step, for all four;
- ``sjd-w16-graphs``: speculative Jacobi decoding, window 16, through the shared loop with captured
  steps (random weights accept few drafts: read its ms per *call*);
- ``hf-static-compiled``: plain transformers ``generate``, batch 2, static cache (auto-compiled), greedy,
  no PURE sampling: the alternative a user has without pure-lite (``--skip-hf`` to leave it out).

Reported: ms per image step over ``--steps`` codes (capture time excluded and reported apart), then full
512² restorations (4096 codes) with graphs, fp16 and torchao int4, each with the torch ops and with the Triton
kernels, and int4 with the int8 KV cache (both ways): seconds, capture seconds and peak VRAM; the fp16 one is
decoded twice on the same decoder, the second reusing the graphs (its time with no capture in it checks
``capture_s``). ``--quick`` runs four of them, once each (below).

    python benchmarks/gpu_decode.py [--steps 256] [--skip-hf] [--skip-full] [--quick]

``--quick`` (~5 minutes on an H200, estimated) keeps what the engine's open questions need: the fp16 and
torchao int4 graph steps with transformers' layers, the torch ops and the Triton kernels, the int8 KV cache;
and four full restorations, each candidate for the default before its baseline (fp16 with the Triton kernels,
then with the torch ops; int4 with the Triton kernels and the int8 cache, then int4 as the backend loads it
today), each decoded once: at ~40 s a restoration, all seven would not fit the 400 s a lent machine's call
leaves after the tests, and a cut-short run keeps what it finished. It leaves out the eager variants, other
buckets and SDPA kernels, nf4, int8 weights, batched tiles, SJD, the attention timing and transformers'
``generate`` (all measured in runs A-C, docs/gpu.md).

``plan-8GB-card`` / ``plan-12GB-card`` (also with ``--quick``): the memory plan (``pure_lite/torch_backend/memory.py``)
for 7.5 GB and 11 GB (what such a card leaves beside the CUDA context), made from a config folder of this shape
(with the released VQ-8's shapes), then the model built on the host and moved to the GPU a layer at a time as
``load_components`` loads it (``placement.py``: seconds and peak while loading, beside the plan's bound), a full
512² restoration as it chose (weights, KV cache, the cache sized as the plan sizes it) and, when the plan keeps
the VQ codec on the GPU, one tile's VQ decode and encode beside the cache: peak allocated and reserved beside
the plan's predicted peak, ms per step, seconds. A plan that refuses is recorded with its message (the smallest
budget that would do).

``--smoke`` runs the variants' code on CPU with a 2-layer model of the same vocabulary (graph variants
eagerly; no full run, no transformers baseline, no Triton variant: its interpreter would take hours over the
4,200-token prompt): a check of the script, not a measurement.
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import report

PROMPT = 4200
QUICK = {"graphs-b512-transformers", "graphs-b512-unjoined", "graphs-b512", "graphs-b512-triton", "graphs-b512-kv8",
         "graphs-b512-kv8-triton", "torchao-int4-graphs-b512", "torchao-int4-graphs-b512-triton",
         "torchao-int4-graphs-b512-kv8", "torchao-int4-graphs-b512-kv8-triton"}
# --quick's full restorations: each candidate for the default before its baseline (the docstring says why)
QUICK_FULL = {"fp16": {"fp16-triton": {"layers": "triton"}, "fp16": {}},
              "torchao-int4": {"torchao-int4-kv8-triton": {"kv_cache": "int8", "layers": "triton"}, "torchao-int4": {}}}
DEVICE = "cuda"
LAYOUT = None  # PURE's token layout (image ids, grid tokens, row end), from a tiny checkpoint's tokenizer
SHAPE = dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
             num_key_value_heads=32)


def sync() -> None:
    import torch

    if DEVICE == "cuda":
        torch.cuda.synchronize()


def peak_gb() -> float:
    import torch

    return torch.cuda.max_memory_allocated() / 1e9 if DEVICE == "cuda" else float("nan")


def build(quant: str):
    import torch
    from transformers import ChameleonConfig, ChameleonForConditionalGeneration

    vocab = {f"<tok{i}>": i for i in range(16)}
    config = ChameleonConfig(vocab_size=73728, max_position_embeddings=8192, vocabulary_map=vocab, **SHAPE)
    with torch.device(DEVICE):
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
        torch.cuda.empty_cache()
    elif quant == "torchao-int4":  # the torch backend's quantization="int4", applied to the built model
        from pure_lite.torch_backend.quantize import quantize_int4

        model = model.to(torch.bfloat16)  # tinygemm's int4 kernel takes bf16 activations
        fuse_projections(model)  # as the backend loads it: joined, then quantized
        quantize_int4(model)
        torch.cuda.empty_cache()
    elif quant == "torchao-int8":
        from torchao.quantization import Int8WeightOnlyConfig, quantize_

        fuse_projections(model)
        quantize_(model.model.layers, Int8WeightOnlyConfig())  # the decoder layers; lm_head stays as it is
        torch.cuda.empty_cache()
    return model


def fuse_projections(model) -> None:
    """The torch backend's ``fuse_projections``, then the replaced weights' memory handed back."""
    import torch

    from pure_lite.torch_backend.layers import fuse_projections as join

    join(model)
    if DEVICE == "cuda":
        torch.cuda.empty_cache()


PLAN_FOLDER = None  # a folder with this shape's config.json and PURE's tokenizer: what the memory plan reads


def pure_layout():
    import json
    import tempfile

    from pure_lite.testing import make_tiny_checkpoint, write_released_vq_shapes
    from pure_lite.tokens import TokenLayout

    global PLAN_FOLDER
    folder = make_tiny_checkpoint(tempfile.mkdtemp(), layout="pure")
    config = json.loads((folder / "config.json").read_text())
    config.update(SHAPE, num_key_value_heads=SHAPE["num_attention_heads"], max_position_embeddings=4096)
    config.pop("vq_config", None)  # transformers' default VQ-VAE, as build() makes it
    (folder / "config.json").write_text(json.dumps(config))
    write_released_vq_shapes(folder)  # the plan counts PURE's VQ-8 codec, not the tiny one
    PLAN_FOLDER = folder
    return TokenLayout.from_tokenizer_file(folder / "tokenizer.json", vocab_size=73728)


def time_plan(budget: str, side: int = 64) -> dict:
    """The memory plan for ``budget``, then a full restoration loaded and sized as it chose."""
    import torch

    from pure_lite.sampling import SamplingConfig
    from pure_lite.torch_backend import memory

    try:
        chosen = memory.plan(PLAN_FOLDER, budget=memory.parse_bytes(budget), budget_source="benchmark",
                             device=DEVICE).chosen
    except memory.MemoryBudgetError as exc:
        return {"error": str(exc)}
    setting = chosen.setting
    from pure_lite.torch_backend.placement import place

    model = build_on_host(chosen.dtype)
    if DEVICE == "cuda":
        torch.cuda.reset_peak_memory_stats()
    load_start = time.perf_counter()
    # as load_components loads: a layer at a time to the device, joined and quantized there
    place(model, DEVICE, int4=setting.quantization == "int4", tables_on_device=not setting.text_rows_off_device)
    sync()
    load_s, load_peak_gb = time.perf_counter() - load_start, peak_gb()
    kw = {"kv_cache": setting.kv_cache}
    if DEVICE != "cuda":
        kw["graphs"] = False
    if setting.text_rows_off_device:
        kw.update(text_device="cpu", image_phase_ids=LAYOUT.image_phase_ids)
    dec, image_ids = decoder(model, device_loop=True, **kw)
    shape = memory.model_shape(PLAN_FOLDER, chosen.dtype)
    (rows, capacity, _), (_, unconditional, _) = memory.kv_groups(shape, chosen.tile_batch)
    if DEVICE == "cuda":
        torch.cuda.reset_peak_memory_stats()
    weights_gb = torch.cuda.memory_allocated() / 1e9 if DEVICE == "cuda" else float("nan")  # the model, the cache not yet
    dec.prefill([p[:shape.prompt_length] for p in prompts(rows)], capacity, 4, unconditional_capacity=unconditional)
    dec.begin_unconditional()
    start = time.perf_counter()
    dec.decode_plain_image(header(side), side, SamplingConfig(), list(range(rows)), image_ids, LAYOUT.row_end)
    sync()
    seconds = time.perf_counter() - start
    codec_s = float("nan")
    if not setting.codec_on_host:  # then the tile's VQ decode and encode run beside the cache, as restore runs them
        from pure_lite.torch_backend.vq import VQConfig, VQModel

        with torch.device(DEVICE):
            vq = VQModel(VQConfig()).eval()
        codec_start = time.perf_counter()
        pixels = vq.decode(torch.zeros((1, side, side), dtype=torch.int64, device=DEVICE))
        with torch.no_grad():
            vq.encode(pixels)
        sync()
        codec_s = time.perf_counter() - codec_start
        del vq, pixels
    out = {"chosen": chosen.describe(), "predicted_gb": chosen.total / 1e9, "load_s": load_s, "codec_s": codec_s,
           "load_peak_gb": load_peak_gb, "predicted_load_gb": (chosen.weights + chosen.loading) / 1e9,
           "predicted_weights_gb": chosen.weights / 1e9, "weights_allocated_gb": weights_gb,
           "seconds": seconds, "ms_per_step": 1000 * (seconds - dec.capture_s) / (side * side),
           "capture_s": dec.capture_s, "peak_vram_gb": peak_gb(),
           "peak_reserved_gb": torch.cuda.max_memory_reserved() / 1e9 if DEVICE == "cuda" else float("nan")}
    del dec, model
    if DEVICE == "cuda":
        torch.cuda.empty_cache()
    return out


def decoder(model, **kw):
    from pure_lite.torch_backend.chameleon import ImageHead
    from pure_lite.torch_backend.decoder import TorchDecoder

    return TorchDecoder(model, ImageHead(model, LAYOUT.image_ids).to(DEVICE), DEVICE, **kw), LAYOUT.image_ids


def build_on_host(dtype):
    """The 7B shape in ``dtype`` on the host, as a checkpoint is read before ``placement.place`` moves it: built on
    the meta device, then every weight copied from one random vector (norm gains 1), which takes seconds where
    initializing 7B weights one by one on a CPU takes minutes. Values repeat across layers: for memory and
    time only."""
    import torch
    from transformers import ChameleonConfig, ChameleonForConditionalGeneration

    vocab = {f"<tok{i}>": i for i in range(16)}
    config = ChameleonConfig(vocab_size=73728, max_position_embeddings=8192, vocabulary_map=vocab, **SHAPE)
    with torch.device("meta"):
        model = ChameleonForConditionalGeneration(config).to(dtype).eval()
    model.to_empty(device="cpu")
    widest = max(p.numel() for p in model.parameters())
    values = torch.randn(widest, generator=torch.Generator().manual_seed(0)).mul_(0.02).to(dtype)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(values[:p.numel()].view_as(p)) if p.dim() > 1 else p.fill_(1.0)
        fresh = type(model.model.rotary_emb)(config=config)  # its frequencies, computed (to_empty left them unset)
        for name, buffer in fresh.named_buffers():
            model.model.rotary_emb.get_buffer(name).copy_(buffer)
    return model


def prompts(batch: int) -> list:
    return list(np.random.default_rng(0).choice(LAYOUT.image_ids, (batch, PROMPT)))


def header(side: int) -> list[int]:
    return [int(t) for t in LAYOUT.header(side * 8, side * 8)]


def open_rows(dec, side: int, batch: int = 1) -> None:
    block = side * (side + 1) + 4
    dec.prefill(prompts(batch), PROMPT + block + 8, 3, unconditional_capacity=block + 3)
    dec.begin_unconditional()


def time_host(model, side: int) -> dict:
    """The shared loop's plain path: logits to the host, NumPy sampler, ids back."""
    from pure_lite.sampling import NumpySampler, SamplingConfig

    dec, image_ids = decoder(model, graphs=False, device_loop=False)
    open_rows(dec, side)
    config, rng, sampler = SamplingConfig(), np.random.default_rng(0), NumpySampler()
    sync()
    start = time.perf_counter()
    logits = dec.step(np.array([header(side)] * 2), image=True)
    for j in range(side * side - 1):
        code, _ = sampler.image_code(logits[0], logits[1], config, rng)
        ids = [int(image_ids[code])] + ([LAYOUT.row_end] if j % side == side - 1 else [])
        logits = dec.step(np.array([ids, ids]), image=True)
    sync()
    return {"ms_per_step": 1000 * (time.perf_counter() - start) / (side * side)}


def time_chained(model, side: int, batch: int = 1, again: bool = False, sdpa=None, **kw) -> dict:
    """``sdpa``: an SDPA backend the captured steps' attention is held to (default: PyTorch's choice)."""
    import contextlib

    from torch.nn.attention import sdpa_kernel

    with sdpa_kernel(sdpa) if sdpa is not None else contextlib.nullcontext():
        return _time_chained(model, side, batch, again, **kw)


def _time_chained(model, side: int, batch: int, again: bool, **kw) -> dict:
    import torch

    from pure_lite.sampling import SamplingConfig

    kw.setdefault("device_loop", True)
    if DEVICE != "cuda":
        kw["graphs"] = False  # --smoke: the graph variants' code, eagerly
    dec, image_ids = decoder(model, **kw)
    if DEVICE == "cuda":
        torch.cuda.reset_peak_memory_stats()
    open_rows(dec, side, batch)
    sync()
    prefill_peak = peak_gb()
    if DEVICE == "cuda":
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    codes, _, _ = dec.decode_plain_image(header(side), side, SamplingConfig(), list(range(batch)), image_ids,
                                         LAYOUT.row_end)
    sync()
    seconds = time.perf_counter() - start
    out = {"ms_per_step": 1000 * (seconds - dec.capture_s) / (side * side), "capture_s": dec.capture_s,
           "graphs": len(dec.captured), "seconds": seconds, "distinct_codes": int(len(np.unique(codes))),
           "peak_vram_gb": max(prefill_peak, peak_gb()), "peak_decode_vram_gb": peak_gb(),
           "peak_reserved_gb": torch.cuda.max_memory_reserved() / 1e9 if DEVICE == "cuda" else float("nan")}
    if again:  # the next restoration of the same size on the same decoder: its graphs are reused
        captured, capture_s = len(dec.captured), dec.capture_s
        open_rows(dec, side, batch)
        sync()
        start = time.perf_counter()
        dec.decode_plain_image(header(side), side, SamplingConfig(), list(range(batch)), image_ids, LAYOUT.row_end)
        sync()
        out.update(seconds_again=time.perf_counter() - start, graphs_captured_again=len(dec.captured) - captured,
                   capture_s_again=dec.capture_s - capture_s)
    return out


def time_attention(heads: int, head_dim: int, layers: int, spans=(8400, 4200), repeats: int = 20) -> dict:
    """Where the step's attention time goes: the two groups' decode attention at the end of a 512² restoration
    (conditional rows 8.4k slots, unconditional 4.2k, one query each, masked as TorchDecoder masks them), for
    every layer's own keys, per SDPA kernel and as plain matmuls. Captured in a CUDA graph so launches do not
    count. Reads: the KV bytes each kernel must stream; GB/s says how close to the card's bandwidth it gets."""
    import torch
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    dtype = torch.float16 if DEVICE == "cuda" else torch.float32
    groups = []
    for span in spans:
        keys = [torch.randn(1, heads, span, head_dim, device=DEVICE, dtype=dtype) for _ in range(layers)]
        values = [torch.randn_like(k) for k in keys]
        mask = (torch.arange(span, device=DEVICE) < span - 7).view(1, 1, 1, span)  # a few stale slots
        groups.append((keys, values, mask))
    query = torch.randn(1, heads, 1, head_dim, device=DEVICE, dtype=dtype)
    scale = head_dim ** -0.5

    def matmul(q, k, v, mask):
        scores = torch.matmul(q, k.transpose(-1, -2)).float() * scale
        return torch.matmul(scores.masked_fill(~mask, float("-inf")).softmax(-1).to(v.dtype), v)

    kernels = {"sdpa-default": None, "sdpa-efficient": SDPBackend.EFFICIENT_ATTENTION,
               "sdpa-cudnn": SDPBackend.CUDNN_ATTENTION, "sdpa-math": SDPBackend.MATH, "matmul": "matmul"}
    bytes_read = sum(2 * layers * heads * span * head_dim * query.element_size() for span in spans)
    out = {"kv_gb_per_step": bytes_read / 1e9}
    for name, backend in kernels.items():
        def body():
            for keys, values, mask in groups:
                for k, v in zip(keys, values):
                    if backend == "matmul":
                        matmul(query, k, v, mask)
                    elif backend is None:
                        F.scaled_dot_product_attention(query, k, v, attn_mask=mask, scale=scale)
                    else:
                        with sdpa_kernel(backend):
                            F.scaled_dot_product_attention(query, k, v, attn_mask=mask, scale=scale)
        try:
            with torch.inference_mode():
                body()  # warm-up (and: does this kernel take these inputs at all?)
                if DEVICE == "cuda":
                    graph = torch.cuda.CUDAGraph()
                    with torch.cuda.graph(graph):
                        body()
                    run = graph.replay
                else:
                    run = body
                sync()
                start = time.perf_counter()
                for _ in range(repeats):
                    run()
                sync()
            ms = 1000 * (time.perf_counter() - start) / repeats
            out[name] = {"ms_per_step": ms, "gb_per_s": bytes_read / ms / 1e6}
        except Exception as exc:  # a kernel that refuses the mask or the shape is reported, not fatal
            out[name] = {"error": f"{type(exc).__name__}: {exc}"[:200]}
        print("attention", name, out[name], flush=True)
    return out


def time_jacobi(model, side: int, window: int) -> dict:
    """Speculative Jacobi decoding through the shared loop (each call a captured graph, the acceptance on the
    host). Random weights accept almost no drafts, so this measures the cost of a window call, not SJD's gain:
    multiply by the calls per image measured on a trained model (docs/benchmarks.md, jacobi)."""
    from pure_lite.generate import generate_batch
    from pure_lite.sampling import SamplingConfig

    dec, _ = decoder(model)
    config = SamplingConfig(jacobi_window=window, max_text_tokens=0)
    sync()
    start = time.perf_counter()
    out = generate_batch(dec, prompts(1), LAYOUT, side * 8, config, [np.random.default_rng(0)],
                         max_positions=1 << 16)[0]
    sync()
    seconds = time.perf_counter() - start - dec.capture_s
    calls = out.timings["decoder_calls"]
    return {"ms_per_step": 1000 * seconds / (side * side), "ms_per_call": 1000 * seconds / calls, "calls": calls,
            "capture_s": dec.capture_s, "graphs": len(dec.captured)}


def time_hf(model, steps: int) -> dict:
    """transformers' generate, batch 2, static cache: its auto-compile (CUDA graphs) is timed apart."""
    import torch

    ids = torch.as_tensor(np.stack(prompts(2)), device=DEVICE)
    kw = dict(max_new_tokens=steps, min_new_tokens=steps, do_sample=False, cache_implementation="static")
    start = time.perf_counter()
    model.generate(ids, **kw)  # compiles
    first = time.perf_counter() - start
    short = dict(kw, max_new_tokens=8, min_new_tokens=8)
    sync()
    start = time.perf_counter()
    model.generate(ids, **short)
    sync()
    fixed = time.perf_counter() - start  # prefill and set-up, subtracted below
    start = time.perf_counter()
    model.generate(ids, **kw)
    sync()
    total = time.perf_counter() - start
    return {"ms_per_step": 1000 * (total - fixed) / (steps - 8), "first_call_s": first}


def main() -> None:
    import torch

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=256, help="codes per timed variant (a square: 256 = 16x16)")
    parser.add_argument("--skip-hf", action="store_true")
    parser.add_argument("--skip-full", action="store_true")
    parser.add_argument("--quick", action="store_true", help="only the variants the open questions need (above)")
    parser.add_argument("--smoke", action="store_true", help="check the script on CPU with a 2-layer model")
    parser.add_argument("--partial", help="rewrite the results so far to this JSON file after every variant, so a "
                        "run cut short by a time limit still reports what it measured")
    args = parser.parse_args()
    global DEVICE
    if args.smoke:
        DEVICE, args.skip_full, args.skip_hf = "cpu", True, True
        SHAPE.update(hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
                     num_key_value_heads=4)
    elif not torch.cuda.is_available():
        raise SystemExit("error: this benchmark needs a CUDA GPU (--smoke checks it on CPU)")
    side = int(round(args.steps ** 0.5))
    if side % 4:
        raise SystemExit("error: --steps must be the square of a multiple of 4 (codes of an image whose side is a "
                         "multiple of 32 px): 64, 256, 576, ...")
    global LAYOUT
    LAYOUT = pure_layout()
    results = {"device": torch.cuda.get_device_name() if DEVICE == "cuda" else "cpu (smoke)", "torch": torch.__version__, "prompt": PROMPT,
               "steps": side * side, "variants": {}, "full_512": {}}
    import transformers

    results["transformers"] = transformers.__version__

    def save_partial() -> None:
        if args.partial:
            with open(args.partial, "w") as f:
                json.dump(results, f, indent=1)

    def record(name, fn, *a, **kw):
        if (args.quick and name not in QUICK) or (args.smoke and "triton" in name):  # smoke: interpreted, too slow
            return
        try:
            results["variants"][name] = fn(*a, **kw)
        except Exception as exc:  # a variant that cannot run is reported, the others still run
            results["variants"][name] = {"error": f"{type(exc).__name__}: {exc}"[:300]}
        print(name, results["variants"][name], flush=True)
        save_partial()

    heads, head_dim = SHAPE["num_attention_heads"], SHAPE["hidden_size"] // SHAPE["num_attention_heads"]
    if not args.quick:
        results["attention"] = time_attention(heads, head_dim, SHAPE["num_hidden_layers"],
                                              spans=(8400, 4200) if DEVICE == "cuda" else (300, 150))
        save_partial()
    for quant in ("fp16", "torchao-int4") if args.quick else ("fp16", "nf4", "torchao-int4", "torchao-int8"):
        try:
            model = build(quant)
        except Exception as exc:  # not installed, or its kernels refuse this GPU: reported
            results["variants"][quant] = {"error": f"{type(exc).__name__}: {exc}"[:300]}
            print(quant, results["variants"][quant], flush=True)
            save_partial()
            continue
        prefix = "" if quant == "fp16" else quant + "-"
        if quant == "fp16":  # first, while the model has transformers' separate projections
            if not args.skip_hf:
                record("hf-static-compiled", time_hf, model, side * side)
            record("graphs-b512-transformers", time_chained, model, side, attend_bucket=512, layers="transformers")
            record("graphs-b512-unjoined", time_chained, model, side, attend_bucket=512)
            fuse_projections(model)  # the rest as the torch backend loads it
            record("graphs-b512", time_chained, model, side, attend_bucket=512)  # the next two: before / after
            record("graphs-b512-triton", time_chained, model, side, attend_bucket=512, layers="triton")
            record("eager-host", time_host, model, side)
        record(prefix + "eager-chained", time_chained, model, side, graphs=False, device_loop=True)
        for bucket in ((512, 1024, 1 << 20) if quant == "fp16" else (512,)):
            name = f"{prefix}graphs-b{bucket if bucket < 1 << 20 else 'full'}"
            if name not in results["variants"]:
                record(name, time_chained, model, side, attend_bucket=bucket)
            if quant == "torchao-int4":
                record(name + "-triton", time_chained, model, side, attend_bucket=bucket, layers="triton")
            if quant == "fp16" and bucket == 512:  # the attention kernels measured alone, in the whole step
                from torch.nn.attention import SDPBackend

                for kernel in ("EFFICIENT_ATTENTION", "CUDNN_ATTENTION", "MATH"):
                    record(f"{name}-{kernel.split('_')[0].lower()}", time_chained, model, side, attend_bucket=512,
                           sdpa=getattr(SDPBackend, kernel))
        if quant in ("fp16", "torchao-int4"):  # the KV cache in int8 (kv_cache="int8"): half its memory
            record(f"{prefix}graphs-b512-kv8", time_chained, model, side, attend_bucket=512, kv_cache="int8")
            # and read by the Triton attention kernel, without a copy in the model's dtype
            record(f"{prefix}graphs-b512-kv8-triton", time_chained, model, side, attend_bucket=512, kv_cache="int8",
                   layers="triton")
        if quant in ("fp16", "nf4"):  # tiles decoded together (issue 12): one step serves 4 tiles' 8 rows
            record(f"{prefix}graphs-b512-4-tiles", time_chained, model, side, batch=4, attend_bucket=512)
        if quant == "fp16":
            record("sjd-w16-graphs", time_jacobi, model, side, 16)
        # nf4's full restoration is left out (run B: 48.5 s, behind int4 at the same VRAM) to keep the run short
        full = {"fp16": {"fp16": {"again": True}, "fp16-triton": {"layers": "triton"}},
                "torchao-int4": {"torchao-int4": {}, "torchao-int4-triton": {"layers": "triton"},
                                 "torchao-int4-kv8": {"kv_cache": "int8"},
                                 "torchao-int4-kv8-triton": {"kv_cache": "int8", "layers": "triton"}}}
        full = QUICK_FULL if args.quick else full
        for name, kw in ({} if args.skip_full else full.get(quant, {})).items():
            try:
                results["full_512"][name] = time_chained(model, 64, attend_bucket=512, **kw)
            except Exception as exc:
                results["full_512"][name] = {"error": f"{type(exc).__name__}: {exc}"[:300]}
            print("full 512", name, results["full_512"][name], flush=True)
            save_partial()
        del model
        if DEVICE == "cuda":
            torch.cuda.empty_cache()

    # the memory plans for the cards people own, after every other model is freed (their peaks are their own)
    for card, budget in (("8GB", "7.5GB"), ("12GB", "11GB")):  # what such a card has free beside the CUDA context
        name = f"plan-{card}-card"
        try:
            results["full_512"][name] = time_plan(budget, 64 if DEVICE == "cuda" else side)
        except Exception as exc:
            results["full_512"][name] = {"error": f"{type(exc).__name__}: {exc}"[:300]}
        print("full 512", name, results["full_512"][name], flush=True)
        save_partial()

    base = results["variants"].get("eager-host", {}).get("ms_per_step")
    lines = ["| variant | ms per image step | vs eager-host | graphs captured | capture s |", "| --- | --- | --- | --- | --- |"]
    for name, r in results["variants"].items():
        if "ms_per_step" not in r:
            lines.append(f"| {name} | {r.get('error', '')} | | | |")
            continue
        ratio = f"{base / r['ms_per_step']:.1f}x" if base else ""
        lines.append(f"| {name} | {r['ms_per_step']:.2f} | {ratio} | {r.get('graphs', '')} | "
                     f"{r.get('capture_s', 0):.1f} |")
    lines += ["", "| full 512² restoration (4096 codes, graphs, bucket 512) | seconds | capture s | peak VRAM GB "
              "(prefill + decode) | peak while decoding | the next one, same decoder: seconds (graphs captured) |",
              "| --- | --- | --- | --- | --- | --- |"]
    for quant, r in results["full_512"].items():
        if "seconds" in r:
            again = f"{r['seconds_again']:.1f} ({r['graphs_captured_again']})" if "seconds_again" in r else ""
            if "predicted_gb" in r:  # a memory plan's row: what it chose, predicted beside measured
                codec = "on the CPU" if np.isnan(r["codec_s"]) else f"a tile on the GPU in {r['codec_s']:.2f} s"
                again = (f"plan: {r['chosen']}; predicted {r['predicted_gb']:.2f} GB (weights "
                         f"{r['predicted_weights_gb']:.2f}, allocated before the prefill {r['weights_allocated_gb']:.2f})"
                         f"; loading {r['load_s']:.0f} s, peak {r['load_peak_gb']:.2f} GB (predicted at most "
                         f"{r['predicted_load_gb']:.2f}); VQ codec {codec}; {r['ms_per_step']:.2f} ms per step")
            lines.append(f"| {quant} | {r['seconds']:.1f} | {r['capture_s']:.1f} | {r['peak_vram_gb']:.1f} "
                         f"(reserved {r['peak_reserved_gb']:.1f}) | {r.get('peak_decode_vram_gb', float('nan')):.1f} | {again} |")
        else:
            lines.append(f"| {quant} | {r.get('error', '')} | | | | |")
    attention = results.get("attention", {})  # not measured with --quick
    if attention:
        lines += ["", f"| decode attention at the end of a 512² restoration ({attention['kv_gb_per_step']:.1f} GB "
                  "of KV per step, all layers, both groups, one graph) | ms per step | GB/s |", "| --- | --- | --- |"]
    for name, r in attention.items():
        if isinstance(r, dict):
            lines.append(f"| {name} | {r['ms_per_step']:.2f} | {r['gb_per_s']:.0f} |" if "ms_per_step" in r
                         else f"| {name} | {r['error']} | |")
    table = "\n".join(lines) + f"\n\n{results['device']}, torch {results['torch']}, transformers {results['transformers']}"
    if args.smoke:
        print(table)
    else:
        report.write("gpu_decode", results, table)


if __name__ == "__main__":
    main()
