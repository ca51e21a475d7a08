"""The torch backend: a checkpoint folder in PURE's released layout, run by torch (+ transformers' weights).

Everything that imports torch at module level in ``pure_lite`` lives in this package (training in
``pure_lite.train`` and the build-time ``pure_lite.export`` load torch too, on their own); ``import
pure_lite`` never imports it. The pipeline reaches it only through ``load.load_components``, which hands
back the same ``Components`` the ONNX runtime does. Read bottom-up:

- ``vq.py``          LlamaGen's VQ-8 image tokenizer (state-dict compatible with the release)
- ``chameleon.py``   the language model: loading, ``ChameleonStep`` (one call with explicit KV), the heads
- ``quantize.py``    weights at load time: bitsandbytes nf4/int8, torchao int4
- ``layers.py``      Chameleon's decoder layers as the decoder runs them (fewer kernels), ``fuse_projections``
- ``fused_kernels.py`` Triton kernels for the layers' elementwise work and the int8 attention (``layers="triton"``)
- ``kv_cache.py``    the preallocated two-group KV cache (bf16/fp16, int8 or int4)
- ``sampler.py``     the sampler on the device, on batched logits, with no host syncs
- ``decoder.py``     ``TorchDecoder``: the ``Decoder`` protocol of ``pure_lite.generate``, CUDA graphs, the chained loop
- ``load.py``        a checkpoint folder -> ``Components``

Nothing here imports the package itself (no ``__init__`` re-exports): a module loads what it names.
"""
