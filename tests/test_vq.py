import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from pure_lite.checkpoint import convert_vq, load_vq_state_dict
from pure_lite.errors import CheckpointError
from pure_lite.torch_backend.vq import VQConfig, VQModel

STATE_DICT = Path(__file__).parent / "data" / "llamagen_vq8_state_dict.txt"  # the release's names and shapes (docs/pure-format.md §4)


def _spec_list():
    rows = []
    for line in STATE_DICT.read_text().splitlines():
        name, shape = line.split(" ", 1)
        rows.append((name, tuple(int(x) for x in shape.strip("()").split(",") if x.strip())))
    return rows


def test_default_state_dict_equals_spec_list():
    with torch.device("meta"):
        model = VQModel()
    mine = [(k, tuple(v.shape)) for k, v in model.state_dict().items()]
    assert sorted(mine) == sorted(_spec_list())
    assert len(mine) == 300
    assert sum(int(np.prod(shape)) for _, shape in mine) == 70_175_371  # docs/pure-format.md §4: 70.2 M values


def test_narrow_round_trip_shapes_and_ranges():
    torch.manual_seed(0)
    cfg = VQConfig(base_channels=32, z_channels=32, codebook_size=64)
    vq = VQModel(cfg).eval()
    x = torch.rand(1, 3, 64, 96) * 2 - 1
    codes = vq.encode(x)
    assert codes.shape == (1, 8, 12) and codes.dtype == torch.int64
    assert 0 <= codes.min() and codes.max() < 64
    img = vq.decode(codes)
    assert img.shape == (1, 3, 64, 96)
    assert img.min() >= -1 and img.max() <= 1
    # Encoding is a nearest-code search: decoding then re-quantising the same latents is stable.
    z = vq.quantize.lookup(codes)
    np.testing.assert_array_equal(vq.quantize.nearest(z), codes)


def test_widths_inferred_and_strict_load(tiny_compact):
    state = load_vq_state_dict(tiny_compact / "vq_ds8_c2i.pt")
    cfg = VQConfig.from_state_dict(state)
    assert cfg.base_channels == 32 and cfg.codebook_size == 256 and cfg.channel_mult == (1, 2, 2, 4)
    VQModel(cfg).load_state_dict(state, strict=True)


def test_safetensors_conversion_is_identical(tiny_compact, tmp_path):
    src = tiny_compact / "vq_ds8_c2i.pt"
    dst = convert_vq(src, tmp_path / "vq.safetensors")
    a, b = load_vq_state_dict(src), load_vq_state_dict(dst)
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)


class _RunsCode:
    def __reduce__(self):
        return (Path.touch, (Path(self.marker),))


def test_pickle_that_runs_code_is_refused(tmp_path):
    marker = tmp_path / "pwned"
    evil = _RunsCode()
    evil.marker = str(marker)
    path = tmp_path / "vq_ds8_c2i.pt"
    torch.save({"model": evil}, path, pickle_module=pickle)
    with pytest.raises(CheckpointError, match="safely"):
        load_vq_state_dict(path)
    assert not marker.exists()


def test_truncated_vq_file(tiny_compact, tmp_path):
    data = (tiny_compact / "vq_ds8_c2i.pt").read_bytes()
    bad = tmp_path / "vq_ds8_c2i.pt"
    bad.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError):
        load_vq_state_dict(bad)
