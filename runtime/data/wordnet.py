"""WordNet topics (Debian wordnet-base), the text task: noun glosses labelled by topic -> TextClassData."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from fedafd.runtime.data.fetch import locate
from fedafd.runtime.data.prepared import TextClassData, corrupt, load_prepared, stratified_split, subset

WORDNET_NOUNS = "usr/share/wordnet/data.noun"
# WordNet 3.0's lexicographer files, indexed by field 2 of a data.* line (lexnames(5WN)).
WORDNET_LEXNAMES = (
    "adj.all", "adj.pert", "adv.all", "noun.Tops", "noun.act", "noun.animal", "noun.artifact", "noun.attribute",
    "noun.body", "noun.cognition", "noun.communication", "noun.event", "noun.feeling", "noun.food", "noun.group",
    "noun.location", "noun.motive", "noun.object", "noun.person", "noun.phenomenon", "noun.plant",
    "noun.possession", "noun.process", "noun.quantity", "noun.relation", "noun.shape", "noun.state",
    "noun.substance", "noun.time",
)
# Concrete topics that the emoji names also cover (clothing and objects, people, plants, animals, places,
# substances, food, body parts); the class index is the position here.
WORDNET_TOPICS = ("artifact", "person", "plant", "animal", "location", "substance", "food", "body")


def _read_wordnet_glosses(path: Path) -> tuple[list[str], list[int]]:
    """Glosses of the noun synsets in WORDNET_TOPICS and their topic index. A data.noun line reads
    `offset lex_filenum n word_count words... pointers... | gloss`; licence lines start with two spaces."""
    wanted = {WORDNET_LEXNAMES.index(f"noun.{topic}"): label for label, topic in enumerate(WORDNET_TOPICS)}
    texts, labels, synsets = [], [], 0
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if line.startswith("  ") or not line.strip():
                continue
            fields = line.split(" ", 3)
            head, sep, gloss = line.partition(" | ")
            if len(fields) < 4 or not fields[1].isdigit() or not sep:
                raise corrupt("WordNet noun file", path, f"line {number} is not a synset")
            lexfile = int(fields[1])
            if lexfile >= len(WORDNET_LEXNAMES):
                raise corrupt("WordNet noun file", path, f"line {number}: lexicographer file {lexfile}")
            synsets += 1
            if lexfile in wanted and gloss.strip():
                texts.append(gloss.strip())
                labels.append(wanted[lexfile])
    counts = np.bincount(np.asarray(labels, dtype=np.int64), minlength=len(WORDNET_TOPICS))
    if synsets == 0 or counts.min() == 0:
        raise corrupt("WordNet noun file", path, f"{synsets} synsets, per topic {counts.tolist()}")
    return texts, labels


def _build_wordnet() -> dict[str, TextClassData]:
    from fedafd.runtime.data.text import tokenize

    texts, labels = _read_wordnet_glosses(locate(WORDNET_NOUNS, "wordnet"))
    labels_array = np.asarray(labels, dtype=np.int64)
    input_ids, attention_mask = tokenize(texts)
    everything = TextClassData(input_ids, attention_mask, labels_array, WORDNET_TOPICS, tuple(texts))
    train, test = stratified_split(labels_array)
    return {"train": subset(everything, train), "test": subset(everything, test)}


def load_wordnet_topics(split: str) -> TextClassData:
    """WordNet 3.0 noun glosses labelled by topic (WORDNET_TOPICS, 48,994 texts): "train" 39,195 / "test"
    9,799, a fixed stratified 80/20 split."""
    return load_prepared("wordnet", split, TextClassData, _build_wordnet)
