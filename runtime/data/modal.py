"""The data sets as ModalData (runtime/data/views.py), loaded once per process and shared read-only: each device
kind's task set and the public set, as the catalogue (runtime/data/datasets.py) names them, with their frozen
backbones' cached features; and the list of every feature cache a federation reads."""

from __future__ import annotations

import functools
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path


from fedafd.runtime.backbones import BACKBONE_IMAGE_SIZE, backbone_spec, is_cached, modality_backbones
from fedafd.runtime.data.features import backbone_features, compute_features, feature_cache_path
from fedafd.runtime.data.prepared import SPLITS, ImageClassData, PairData, TextClassData
from fedafd.runtime.data.sources.options import DataOptions, load_options
from fedafd.runtime.data.sources.records import DataFormatError
from fedafd.runtime.data.sources.registry import DEMO_DEFAULTS, PUBLIC, Source, data_digest, open_source
from fedafd.runtime.data.views import RAW, ModalData
from fedafd.runtime.vocabulary import MODALITIES, MODALITIES_OF_KIND

__all__ = ["RAW", "ModalData", "load_public_data", "load_task_data"]


def from_image_classes(data: ImageClassData) -> ModalData:
    return ModalData({"image": (data.images,)}, data.labels, tuple(data.class_names), pictures=data.pictures)


def from_text_classes(data: TextClassData) -> ModalData:
    return ModalData({"text": (data.input_ids, data.attention_mask)}, data.labels, tuple(data.class_names),
                     texts=tuple(data.texts))


def from_pairs(data: PairData) -> ModalData:
    """Row i's image and caption are a matched pair (rows of one picture share its image id); `labels`
    carries the category for partitioning."""
    return ModalData(
        {"image": (data.images,), "text": (data.input_ids, data.attention_mask)},
        data.groups,
        tuple(data.group_names),
        image_ids=data.image_ids,
        texts=tuple(data.captions),
        pictures=data.pictures,
    )


def read_only(data: ModalData) -> ModalData:
    """`data` with every array marked read-only: loaded once per process and shared by whoever asks (the
    server and every device of a simulation), so none of them may write into it."""
    pictures = () if data.pictures is None else (*data.pictures.blobs, data.pictures.spans)
    for array in [*(a for arrays in data.inputs.values() for a in arrays), *data.features.values(), data.labels,
                  data.image_ids, *pictures]:
        if array is not None:
            array.setflags(write=False)
    return data


def as_modal(data: ImageClassData | TextClassData | PairData) -> ModalData:
    """Prepared arrays as the one view training reads."""
    if isinstance(data, ImageClassData):
        return from_image_classes(data)
    if isinstance(data, TextClassData):
        return from_text_classes(data)
    return from_pairs(data)


@functools.lru_cache(maxsize=None)
def load_task_data(kind: str, split: str, backbones: tuple[str, ...] = ()) -> ModalData:
    """A device kind's bundled task data set (the demo's devices take their shares): what stands in for the
    paper's data sets is in docs/data.md. Fashion-MNIST and WordNet are cut to their TASK_POOL
    rows. Loaded once per process and shared read-only."""
    source = open_source(kind, DEMO_DEFAULTS[kind])
    return rows_view(source.splits[split], split, backbones)


@dataclass(frozen=True)
class PublicSpec:
    """Where the public set (or the server's eval set) comes from ("": the bundled emoji)."""

    location: str = ""
    options: DataOptions = DataOptions()
    on_bad_sample: str = "error"


def public_spec(location: str, data_config: str, on_bad_sample: str = "error") -> PublicSpec:
    return PublicSpec(location, load_options(data_config), on_bad_sample)


@functools.lru_cache(maxsize=None)
def public_source(spec: PublicSpec = PublicSpec()) -> Source:
    return open_source(PUBLIC, spec.location or DEMO_DEFAULTS[PUBLIC], spec.options, spec.on_bad_sample)


@functools.lru_cache(maxsize=None)
def load_public_data(split: str = "train", backbones: tuple[str, ...] = (), spec: PublicSpec = PublicSpec(),
                     eval_spec: PublicSpec | None = None) -> ModalData:
    """The public image-text set: "train" is P's pool, which the server and every device hold (its train
    splits, or all its rows); "test" is the server's retrieval test set: eval_spec's rows (its test split, or
    all of them), else the public source's test split. Loaded once per process and shared read-only."""
    source = public_source(spec)
    if split == "train":
        rows = source.rows(spec.options.train_splits) or source.rows(("all",))
        if rows is None:
            raise DataFormatError(f"{source.location}: none of the train splits {list(spec.options.train_splits)}")
        return rows_view(rows, "train", backbones)
    if eval_spec is not None and eval_spec.location:
        source = public_source(eval_spec)
        rows = source.rows(eval_spec.options.test_splits) or source.rows(("all",))
    else:
        rows = source.rows(spec.options.test_splits)
    if rows is None:
        raise DataFormatError(f"{source.location} has no test split to evaluate the server on: set eval_data")
    return rows_view(rows, "test", backbones)


def rows_view(data: ImageClassData | TextClassData | PairData, split: str, backbones: tuple[str, ...]) -> ModalData:
    """Rows of a source as training reads them, read-only, with the named backbones' cached features."""
    return read_only(with_backbone_features(as_modal(data), rows_name(data, split), backbones))


def rows_name(data: ImageClassData | TextClassData | PairData, split: str) -> str:
    """What names these rows in the feature cache: their digest, so an edited file, another split or another
    test_fraction never reads stale features, and the same rows read through any format (or the bundled set)
    share one cache."""
    return f"{split}-{data_digest({split: data})[:20]}"


def with_backbone_features(data: ModalData, dataset: str, backbones: tuple[str, ...]) -> ModalData:
    """`data` with the cached features of each named backbone attached (computed once, then read from
    the feature cache)."""
    if not backbones:
        return data
    features = dict(data.features)
    for name in backbones:
        if is_cached(name):  # a finetune tower trains, so its features are never cached
            features[name] = backbone_features(name, dataset, data)
    return ModalData(data.inputs, data.labels, data.class_names, features, data.image_ids, texts=data.texts,
                     pictures=data.pictures)


# --- every cache the federation uses -----------------------------------------------------------


def feature_sets() -> list[tuple[str, str, Callable[[], ModalData]]]:
    """(backbone, rows name, loader) for every feature cache the bundled federation reads: each kind's bundled
    set and the public set, with the backbones of their modalities."""
    sets: list[tuple[str, str, Callable[[], ModalData]]] = []
    for split in SPLITS:
        for role, modalities in [*MODALITIES_OF_KIND.items(), (PUBLIC, MODALITIES)]:
            source = open_source(role, DEMO_DEFAULTS[role])
            load = ((lambda k=role, s=split: load_task_data(k, s)) if role != PUBLIC
                    else (lambda s=split: load_public_data(s)))
            name = rows_name(source.splits[split], split)
            sets += [(backbone, name, load) for backbone in modality_backbones(modalities)]
    return sets


def feature_cache_paths() -> dict[str, Path]:
    """"backbone/dataset" -> its cache file, for every set of `feature_sets` (present or not)."""
    return {f"{backbone}/{dataset}": feature_cache_path(backbone, dataset) for backbone, dataset, _ in feature_sets()}


def build_feature_caches(log: Callable[[str], object] = print, progress: bool = True) -> dict[str, float]:
    """Compute (or check) every feature cache of `feature_sets`; logs one line per cache with its time and
    encoding rate. Returns "backbone/dataset" -> seconds (loading the data set excluded). Idempotent: what is
    cached is only read back."""
    seconds = {}
    for backbone, dataset, load in feature_sets():
        data = load()
        start = time.perf_counter()
        features, encode_seconds = compute_features(backbone, dataset, data, BACKBONE_IMAGE_SIZE, progress)
        took = time.perf_counter() - start
        seconds[f"{backbone}/{dataset}"] = took
        if encode_seconds is None:
            how = "cached"
        else:
            unit = "images" if backbone_spec(backbone).modality == "image" else "texts"
            how = f"computed, {len(features) / max(encode_seconds, 1e-9):.0f} {unit}/s"
        log(f"{backbone} features of {dataset}: {features.shape[0]} x {features.shape[1]} ({how}, {took:.1f} s)")
    return seconds
