"""Checks that need a CUDA GPU (marker ``gpu``); on CPU-only machines they are reported as skipped."""

import numpy as np
import pytest

from pure_lite.sampling import NumpySampler, SamplingConfig, entropy_top_k, softmax_entropy, top_k_keep


def _gpu_sampler():
    from pure_lite.errors import MissingDependencyError
    from pure_lite.runtime.cuda_sampler import CupySampler

    try:
        return CupySampler()
    except MissingDependencyError as exc:
        pytest.skip(f"no CUDA sampler here: {exc}")


@pytest.mark.gpu
def test_cuda_sampler_keeps_the_same_top_k_and_draws_the_same_tokens():
    gpu, cpu = _gpu_sampler(), NumpySampler()
    cp = gpu.cp
    rng = np.random.default_rng(0)
    for trial in range(50):
        scale = [0.1, 1.0, 5.0, 20.0][trial % 4]
        cond = (rng.normal(size=16384) * scale).astype(np.float32)
        uncond = (rng.normal(size=16384) * scale).astype(np.float32)
        scores = SamplingConfig().cfg_scale * (cond - uncond) + uncond
        k = entropy_top_k(softmax_entropy(scores))
        assert k == entropy_top_k(gpu.entropy(cp.asarray(scores)))
        np.testing.assert_array_equal(cp.asnumpy(gpu.top_k_keep(cp.asarray(scores), k)), top_k_keep(scores, k))
        a = cpu.image_code(cond, uncond, SamplingConfig(), np.random.default_rng(trial))
        b = gpu.image_code(cond, uncond, SamplingConfig(), np.random.default_rng(trial))
        assert a[0] == b[0]
