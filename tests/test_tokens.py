import numpy as np
import pytest

from pure_lite.errors import TokenFormatError
from pure_lite.tokens import (
    TokenLayout, code_from_image_token_name, image_block_length, image_token_name,
)


def test_released_ids_found_by_name(pure_layout):
    L = pure_layout
    assert (L.image_start, L.image_end, L.row_end, L.end_of_turn) == (8197, 8196, 8803, 8710)
    assert L.grid_id(16) == 8804 + 16
    assert L.codebook_size == 16384
    assert L.image_ids[0] == 4 and L.image_ids[8191] == 8195
    assert L.image_ids[8192] == 65536 and L.image_ids[-1] == 73727
    assert L.code_of[65536] == 8192 and L.code_of[8196] == -1


def test_compact_layout_uses_other_ids(compact_layout, pure_layout):
    assert compact_layout.image_start != pure_layout.image_start
    assert compact_layout.vocab_size < 1000


@pytest.mark.parametrize("code", [0, 7, 10, 8191, 16383])
def test_image_token_names_round_trip(code):
    assert code_from_image_token_name(image_token_name(code)) == code


def test_encode_parse_round_trip(compact_layout):
    codes = np.random.default_rng(0).integers(0, compact_layout.codebook_size, size=(8, 12))
    block = compact_layout.encode_image(codes)
    assert len(block) == image_block_length(64, 96)
    np.testing.assert_array_equal(compact_layout.parse_image(block), codes)


def test_512_block_is_4164_tokens(pure_layout):
    block = pure_layout.encode_image(np.zeros((64, 64), dtype=np.int64))
    assert len(block) == 4164
    assert block[1] == block[2] == pure_layout.grid_id(16)


def _block(layout):
    return list(layout.encode_image(np.arange(64).reshape(8, 8) % layout.codebook_size))


def test_malformed_blocks_rejected_with_position(compact_layout):
    L = compact_layout
    good = _block(L)
    w = 8
    cases = {
        "missing start": (good[1:], 0),
        "truncated": (good[:40], 40),
        "missing eoss": (good[:-1], len(good) - 1),
        "trailing": (good + [L.image_ids[0]], len(good)),
        "short row": (good[:3 + w - 1] + good[3 + w:], 3 + w - 1),
        "long row": (good[:3 + w] + [L.image_ids[0]] + good[3 + w:], 3 + w),
        "non-image inside": (good[:5] + [L.bos] + good[6:], 5),
        "bad grid": (good[:1] + [L.bos] + good[2:], 1),
    }
    for name, (ids, pos) in cases.items():
        with pytest.raises(TokenFormatError) as info:
            L.parse_image(ids)
        assert info.value.position == pos, name


def test_grid_disagreeing_with_rows(compact_layout):
    L = compact_layout
    good = _block(L)
    lying = [good[0], L.grid_id(3), good[2]] + good[3:]  # says 12 rows, has 8
    with pytest.raises(TokenFormatError, match="truncated|row"):
        L.parse_image(lying)


def test_encode_rejects_bad_codes(compact_layout):
    with pytest.raises(TokenFormatError):
        compact_layout.encode_image(np.zeros((5, 8), dtype=np.int64))
    with pytest.raises(TokenFormatError):
        compact_layout.encode_image(np.full((4, 4), compact_layout.codebook_size))


def test_missing_special_token_is_a_checkpoint_error():
    from pure_lite.errors import CheckpointError

    with pytest.raises(CheckpointError, match="racm3"):
        TokenLayout.from_vocab({"<s>": 0, image_token_name(0): 1})
