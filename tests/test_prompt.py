import numpy as np

from pure_lite.prompt import IGNORE_INDEX, INSTRUCTION, TextTokenizer, parse_response, prompt_ids, training_example


def test_prompt_and_training_labels(tiny_compact, compact_layout):
    tok = TextTokenizer(tiny_compact / "tokenizer.json")
    L = compact_layout
    lq = L.encode_image(np.zeros((4, 4), np.int64))
    hq = L.encode_image(np.ones((8, 8), np.int64))
    prompt = prompt_ids(tok, L, lq)
    assert prompt[0] == L.bos and prompt[-1] == L.end_of_turn
    assert tok.decode(prompt[1:-1 - len(lq)]) == INSTRUCTION
    np.testing.assert_array_equal(prompt[-1 - len(lq):-1], lq)
    ids, labels = training_example(tok, L, lq, "Small noise. A cat.", hq)
    n = len(prompt)
    np.testing.assert_array_equal(ids[:n], prompt)
    assert (labels[:n] == IGNORE_INDEX).all()
    np.testing.assert_array_equal(labels[n:], ids[n:])
    assert labels[-1] == L.end_of_turn and tok.decode(ids[n:n + 19]) == "Small noise. A cat."


def test_parse_response():
    r = parse_response("The image has medium noise and small blur. A dog on grass.")
    assert r.degradation == "The image has medium noise and small blur."
    assert r.description == "A dog on grass."
    assert parse_response("A dog on grass.").degradation is None
    assert parse_response("  ") == parse_response("")
    assert parse_response("Large JPEG artifacts.").description is None
