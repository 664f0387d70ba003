"""Pretrained towers of the user's own, from local files only: what a tower is (`TowerSpec`), how it is
written (`parse_tower`), how it is loaded safely (`load_tower`) and what names its weights and preprocessing
(`tower_digest`). Not yet wired into training, the feature cache or export (issue 31's next steps).

A tower is written `SOURCE:PATH` on the command line (`hf:./bert`; `torchvision:resnet18:./w.safetensors`,
`timm:ARCH:./w.safetensors`: those two need the architecture) or as a TOML table with every key of
`TowerSpec`. Sources:
- `hf`: a Hugging Face folder (config.json and model.safetensors), loaded by transformers' own
  `AutoModel.from_pretrained(folder, local_files_only=True, use_safetensors=True)`;
- `torchvision`: an architecture name and a weights file (.safetensors, or a .pt/.pth that
  torch's loader reads with weights_only=True), torchvision imported only when named;
- `timm`: the same through timm (the optional extra `fedafd[timm]`), imported only when named.

The preprocessing belongs to the tower and is never left at a default: the trouble users of timm and
open_clip report again and again is a model whose weights were loaded from a file while its input size,
mean and std silently stayed at the library's defaults, so it reads every image a little wrong and nothing
fails. Here an image tower takes image_size, mean, std, resize and crop from the spec, else from the
`preprocessor_config.json` of its folder (beside the weights file for torchvision and timm); when neither
says, `parse_tower` refuses and names the missing key. A text tower's tokenizer is its own folder's (or
the spec's `tokenizer`), max_tokens its model_max_length (capped at 512 and at the model's positions),
pooling mean unless the spec says.

Nothing is downloaded: a hub-like id that is not a local path is refused, and so is any file that needs
full unpickling, each with the one line that converts it where the file is trusted.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Mapping

import numpy as np
import torch
from torch import nn

from fedafd.runtime.errors import FedafdError
from fedafd.runtime.hashing import file_sha256

# Before transformers is imported (lazily, below): never reach for the hub.
os.environ["HF_HUB_OFFLINE"] = "1"

SOURCES = ("hf", "torchvision", "timm")
"""What a user may name; `builtin` (the shipped EfficientNet-Lite0) is described, not named."""
MODALITIES = ("image", "text")
RESIZES = ("shorter", "longer", "stretch")
"""shorter: the shorter side to image_size, then a centre crop; longer: the longer side to image_size, then
padded (with the mean colour) to a square; stretch: both sides to image_size."""
CROPS = ("center", "none")
POOLINGS = ("cls", "mean", "pooler")
TRAINS = ("frozen", "finetune")
MAX_TOKENS_CAP = 512
"""Longest text a tower reads, whatever its tokenizer allows (many say 10^30: 'no limit')."""

TIMM_HINT = "pip install timm (the optional extra: pip install 'fedafd[timm]')"
TORCHVISION_HINT = ("pip install torch==2.14.1 torchvision==0.29.1 (torchvision must be the build matching torch: "
                    "a torchvision from PyPI beside a different torch does not import)")
WEIGHT_SUFFIXES = (".safetensors", ".pt", ".pth")
TOKENIZER_FILES = ("tokenizer.json", "vocab.txt", "vocab.json", "merges.txt", "spiece.model", "sentencepiece.bpe.model",
                   "tokenizer.model", "tokenizer_config.json", "special_tokens_map.json")
"""The files of a tokenizer folder that decide its tokens (those present are hashed into the digest)."""
PREPROCESSOR_FILE = "preprocessor_config.json"

_HUB_ID = re.compile(r"^(hf-hub:)?[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")
_IMAGE_KEYS = ("image_size", "mean", "std", "resize", "crop")
_TEXT_KEYS = ("tokenizer", "max_tokens")
_DIGEST_KEYS = ("source", "arch", "modality", "image_size", "mean", "std", "resize", "crop", "max_tokens", "pooling")
"""The fields a feature depends on: the train regime and the file locations are not part of a tower's identity."""


class TowerError(FedafdError):
    """A tower spec that cannot be used as written (a key, a value, a file, a missing package)."""


@dataclass(frozen=True)
class TowerSpec:
    """One pretrained tower. Unset fields are 0, "" or (); after `parse_tower` every field its modality needs is set."""

    source: str
    """hf, torchvision or timm (builtin: a shipped backbone, see describe_builtin)."""
    path: str
    """A local Hugging Face folder with config.json (hf), or a weights file (torchvision, timm)."""
    arch: str = ""
    """The torchvision/timm architecture name (e.g. resnet18); "" for hf, whose folder names its own."""
    modality: str = ""
    """image or text: told from the hf config (or the source) unless given."""
    image_size: int = 0
    """Side in pixels of the square images the tower reads."""
    mean: tuple[float, ...] = ()
    """Per-channel mean subtracted from images in [0, 1]."""
    std: tuple[float, ...] = ()
    """Per-channel std images in [0, 1] are divided by."""
    resize: str = ""
    """How a stored image is brought to image_size: shorter, longer or stretch (see RESIZES)."""
    crop: str = ""
    """center (with resize=shorter) or none."""
    tokenizer: str = ""
    """Tokenizer folder of a text tower (default: the hf folder itself)."""
    max_tokens: int = 0
    """Tokens per text after truncation and padding ([CLS] and [SEP] included)."""
    pooling: str = ""
    """How (B, L, H) hidden states become (B, H): cls, mean (over real tokens or positions) or pooler (hf only)."""
    train: str = "frozen"
    """frozen (run only; an adapter trains over it) or finetune."""
    finetune_blocks: int = 0
    """With finetune: how many of the last blocks train (0: all)."""
    lr: float = 0.0
    """With finetune: the tower's own learning rate (0: the config's lr)."""

    def preprocessing(self) -> dict[str, Any]:
        """The fields a feature depends on, as JSON-able values (the digest's, and what export saves beside ONNX)."""
        return {key: list(value) if isinstance(value, tuple) else value
                for key, value in ((k, getattr(self, k)) for k in _DIGEST_KEYS)}


# --- parsing -----------------------------------------------------------------------------------


def parse_tower(value: str | Mapping[str, Any] | TowerSpec, where: str) -> TowerSpec:
    """A tower from `SOURCE:PATH` (`torchvision:ARCH:PATH`, `timm:ARCH:PATH`) or a TOML table of TowerSpec's keys,
    checked and completed from its files (modality, preprocessing, max_tokens, pooling). `where` names the
    setting in errors (e.g. "image_tower")."""
    if isinstance(value, TowerSpec):
        values = {f.name: getattr(value, f.name) for f in dataclasses.fields(TowerSpec)}
    elif isinstance(value, str):
        values = _parse_short(value, where)
    elif isinstance(value, Mapping):
        values = dict(value)
    else:
        raise TowerError(f"{where} must be SOURCE:PATH or a table, got {type(value).__name__}")
    spec = _typed(values, where)
    return _resolve(spec, where)


def check_tower_setting(value: str | Mapping[str, Any], where: str) -> None:
    """The checks of parse_tower that need no file (the form, every key and value): what a config's validation
    runs, so a recipe naming towers on another machine parses here; the files are read when the tower is built."""
    if isinstance(value, str) and value.lstrip().startswith("{"):
        value = json.loads(value)
    _typed(_parse_short(value, where) if isinstance(value, str) else dict(value), where)


def _parse_short(value: str, where: str) -> dict[str, Any]:
    source, sep, rest = value.partition(":")
    if not sep or source not in SOURCES:
        if _HUB_ID.match(value) and not Path(value).exists():
            _refuse_hub(value, where)
        raise TowerError(f"{where} must look like SOURCE:PATH with SOURCE one of {', '.join(SOURCES)} "
                         f"(e.g. hf:./bert, torchvision:resnet18:./resnet18.safetensors), got {value!r}")
    if source == "hf":
        return {"source": source, "path": rest}
    arch, sep, path = rest.partition(":")
    if not sep or not arch or not path:
        raise TowerError(f"{where}: {source} needs the architecture: {source}:ARCH:PATH "
                         f"(e.g. {source}:resnet18:./resnet18.safetensors), got {value!r}")
    return {"source": source, "path": path, "arch": arch}


def _typed(values: dict[str, Any], where: str) -> TowerSpec:
    fields = {f.name: f for f in dataclasses.fields(TowerSpec)}
    unknown = [key for key in values if key not in fields]
    if unknown:
        raise TowerError(f"{where}: unknown tower key {unknown[0]!r}; valid keys: {', '.join(fields)}")
    for key in ("source", "path"):
        if key not in values:
            raise TowerError(f"{where}.{key} is required")
    out: dict[str, Any] = {}
    for key, value in values.items():
        default = fields[key].default
        if key in ("mean", "std"):
            out[key] = _triple(value, f"{where}.{key}")
        elif key in ("source", "path") or isinstance(default, str):
            if not isinstance(value, str):
                raise TowerError(f"{where}.{key} must be a string, got {value!r}")
            out[key] = value
        elif isinstance(default, int):
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise TowerError(f"{where}.{key} must be a whole number >= 0, got {value!r}")
            out[key] = value
        else:
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0:
                raise TowerError(f"{where}.{key} must be a number >= 0, got {value!r}")
            out[key] = float(value)
    spec = TowerSpec(**out)
    for key, choices in (("source", SOURCES), ("modality", MODALITIES), ("resize", RESIZES), ("crop", CROPS),
                         ("pooling", POOLINGS), ("train", TRAINS)):
        given = getattr(spec, key)
        if given and given not in choices:
            raise TowerError(f"{where}.{key} must be one of {', '.join(choices)}, got {given!r}")
    if not spec.path:
        raise TowerError(f"{where}.path is empty: name a local folder (hf) or weights file")
    if spec.source == "hf" and spec.arch:
        raise TowerError(f"{where}.arch is for torchvision and timm; an hf folder's config.json names its model")
    if spec.source != "hf" and not spec.arch:
        raise TowerError(f"{where}.arch is required for {spec.source} (e.g. resnet18)")
    if spec.train == "frozen" and (spec.finetune_blocks or spec.lr):
        key = "finetune_blocks" if spec.finetune_blocks else "lr"
        raise TowerError(f"{where}.{key} applies to train = \"finetune\" only")
    return spec


def _triple(value: Any, name: str) -> tuple[float, ...]:
    if (not isinstance(value, (list, tuple)) or len(value) != 3
            or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value)):
        raise TowerError(f"{name} must be three numbers (one per channel), got {value!r}")
    return tuple(float(v) for v in value)


def _refuse_hub(location: str, where: str) -> None:
    raise TowerError(f"{where}: {location!r} is not a local path and looks like a hub id; fedafd never downloads: "
                     f"`huggingface-cli download {location.removeprefix('hf-hub:')} --local-dir DIR` once, then hf:DIR")


def _check_path(spec: TowerSpec, where: str) -> Path:
    path = Path(spec.path).expanduser()
    if not path.exists():
        suffix = path.suffix.lower()
        looks_local = spec.path.startswith((".", "/", "~")) or suffix in WEIGHT_SUFFIXES + (".bin", ".json")
        if not looks_local and _HUB_ID.match(spec.path):
            _refuse_hub(spec.path, where)
        raise TowerError(f"{where}.path: no such {'folder' if spec.source == 'hf' else 'file'} {spec.path}")
    if spec.source == "hf":
        if not path.is_dir() or not (path / "config.json").is_file():
            raise TowerError(f"{where}.path: {spec.path} is not a Hugging Face folder (no config.json in it)")
    elif not path.is_file() or path.suffix.lower() not in WEIGHT_SUFFIXES:
        raise TowerError(f"{where}.path: a {spec.source} tower reads one weights file ({', '.join(WEIGHT_SUFFIXES)}), "
                         f"got {spec.path}")
    return path


def _read_json(path: Path, where: str) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise TowerError(f"{where}: cannot read {path} ({err})") from None


def _resolve(spec: TowerSpec, where: str) -> TowerSpec:
    path = _check_path(spec, where)
    folder = path if spec.source == "hf" else path.parent
    config = _read_json(path / "config.json", where) if spec.source == "hf" else {}
    modality = spec.modality or _modality(spec, config, where)
    changes: dict[str, Any] = {"modality": modality}
    if modality == "image":
        given = [key for key in _TEXT_KEYS if getattr(spec, key)]
        if given:
            raise TowerError(f"{where}.{given[0]} applies to text towers; this one reads images")
        preprocessor = folder / PREPROCESSOR_FILE
        found = _image_preprocessing(_read_json(preprocessor, where)) if preprocessor.is_file() else {}
        for key in _IMAGE_KEYS:
            if not getattr(spec, key):
                if key not in found:
                    said = f"{preprocessor} does not say" if preprocessor.is_file() else f"no {preprocessor} says"
                    raise TowerError(f"{where}.{key} is not set and {said}; set it in the [{where}] table (the "
                                     "model card gives the size, mean and std it was trained with)")
                changes[key] = found[key]
        if spec.source != "hf" and spec.pooling:
            raise TowerError(f"{where}.pooling applies to hf towers; a {spec.source} model pools itself")
        if spec.source == "hf" and not spec.pooling:
            changes["pooling"] = "mean"
    else:
        given = [key for key in _IMAGE_KEYS if getattr(spec, key)]
        if given:
            raise TowerError(f"{where}.{given[0]} applies to image towers; this one reads text")
        tokenizer = Path(spec.tokenizer).expanduser() if spec.tokenizer else path
        if not any((tokenizer / name).is_file() for name in TOKENIZER_FILES[:7]):
            raise TowerError(f"{where}.tokenizer: no tokenizer files ({', '.join(TOKENIZER_FILES[:3])}, ...) in "
                             f"{tokenizer}; name the tokenizer folder")
        changes["tokenizer"] = str(tokenizer)
        if not spec.max_tokens:
            tokenizer_config = tokenizer / "tokenizer_config.json"
            said = _read_json(tokenizer_config, where).get("model_max_length") if tokenizer_config.is_file() else None
            limits = [MAX_TOKENS_CAP, config.get("max_position_embeddings") or MAX_TOKENS_CAP]
            if isinstance(said, (int, float)) and said > 0:
                limits.append(int(said))
            changes["max_tokens"] = int(min(limits))
        if not spec.pooling:
            changes["pooling"] = "mean"
    resolved = dataclasses.replace(spec, **changes)
    _check_preprocessing(resolved, config, where)
    return resolved


def _modality(spec: TowerSpec, config: dict[str, Any], where: str) -> str:
    if spec.source != "hf":
        return "image"
    if "text_config" in config or "vision_config" in config:
        raise TowerError(f"{where}: {spec.path} holds a two-tower model ({config.get('model_type', '?')}); name one "
                         "tower's own folder, or set modality")
    if "num_channels" in config:
        return "image"
    if "vocab_size" in config:
        return "text"
    raise TowerError(f"{where}.modality is not set and {spec.path}/config.json (model_type "
                     f"{config.get('model_type', '?')!r}) does not tell it; set modality = \"image\" or \"text\"")


def _image_preprocessing(processor: dict[str, Any]) -> dict[str, Any]:
    """The image fields a Hugging Face `preprocessor_config.json` gives. Its size before a crop (crop_pct, a
    `size` larger than `crop_size`) is not reproduced: images go straight to image_size, then are cropped."""
    found: dict[str, Any] = {}
    size, crop_size = processor.get("size"), processor.get("crop_size")
    if isinstance(size, int):
        size = {"shortest_edge": size}
    cropped = bool(processor.get("do_center_crop")) or "crop_pct" in processor
    if isinstance(crop_size, int):
        crop_size = {"height": crop_size, "width": crop_size}
    if isinstance(size, dict):
        if "shortest_edge" in size:
            found.update(resize="shorter", crop="center", image_size=int(size["shortest_edge"]))
        elif "longest_edge" in size:
            found.update(resize="longer", crop="none", image_size=int(size["longest_edge"]))
        elif size.get("height") and size.get("height") == size.get("width"):
            found.update(resize="stretch", crop="none", image_size=int(size["height"]))
    crop_side = crop_size.get("height") if isinstance(crop_size, dict) else None
    if cropped and crop_side and crop_side == crop_size.get("width"):
        found.update(resize="shorter", crop="center", image_size=int(crop_side))
    mean, std = processor.get("image_mean"), processor.get("image_std")
    if processor.get("do_normalize") is False:
        mean, std = [0.0] * 3, [1.0] * 3
    # The model reads (x * 255 * rescale_factor - mean) / std from our x in [0, 1].
    scale = 255.0 * float(processor.get("rescale_factor", 1 / 255)) if processor.get("do_rescale", True) else 255.0
    if isinstance(mean, list) and isinstance(std, list) and len(mean) == len(std) == 3:
        found["mean"] = tuple(float(m) / scale for m in mean)
        found["std"] = tuple(float(s) / scale for s in std)
    return found


def _check_preprocessing(spec: TowerSpec, config: dict[str, Any], where: str) -> None:
    if spec.modality == "image":
        if spec.image_size < 16:
            raise TowerError(f"{where}.image_size must be at least 16 px, got {spec.image_size}")
        if any(s <= 0 for s in spec.std):
            raise TowerError(f"{where}.std must be > 0 for every channel, got {list(spec.std)}")
        if (spec.resize == "shorter") != (spec.crop == "center"):
            raise TowerError(f"{where}.crop: resize = \"shorter\" goes with crop = \"center\" (and only it), got "
                             f"resize = {spec.resize!r}, crop = {spec.crop!r}")
        native = config.get("image_size")
        if isinstance(native, int) and native != spec.image_size:
            raise TowerError(f"{where}.image_size is {spec.image_size} but {spec.path}/config.json fixes image_size "
                             f"{native} (its position embeddings): use {native}")
        if spec.pooling == "cls" and "patch_size" not in config:
            raise TowerError(f"{where}.pooling: cls needs a transformer over patches (a ViT); this model gives a "
                             "feature map: use mean or pooler")
    else:
        if spec.max_tokens < 2:
            raise TowerError(f"{where}.max_tokens must be >= 2 (room for [CLS] and [SEP]), got {spec.max_tokens}")
        positions = config.get("max_position_embeddings")
        if isinstance(positions, int) and spec.max_tokens > positions:
            raise TowerError(f"{where}.max_tokens {spec.max_tokens} is more than the model's {positions} positions")


# --- safe loading ------------------------------------------------------------------------------


def check_keys(module: nn.Module, state: Mapping[str, torch.Tensor], what: str = "weights") -> None:
    """Raise TowerError unless `state` has exactly the module's keys, at its shapes (the first 3 of each
    mismatch named): a missing key would silently keep its random initial value."""
    expected = module.state_dict()
    missing = [key for key in expected if key not in state]
    unexpected = [key for key in state if key not in expected]
    shapes = [f"{key} {tuple(state[key].shape)} != {tuple(value.shape)}" for key, value in expected.items()
              if key in state and tuple(state[key].shape) != tuple(value.shape)]
    if missing or unexpected or shapes:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing ({', '.join(missing[:3])}{', ...' if len(missing) > 3 else ''})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected ({', '.join(unexpected[:3])}"
                         f"{', ...' if len(unexpected) > 3 else ''})")
        if shapes:
            parts.append(f"{len(shapes)} of another shape ({'; '.join(shapes[:3])})")
        raise TowerError(f"{what} do not match the model's keys: {'; '.join(parts)}")


def _convert_pickle_hint(path: Path) -> str:
    out = path.with_suffix(".safetensors")
    return (f"convert it once, only where you trust the file: `python -c \"import torch; from safetensors.torch import "
            f"save_file; save_file(torch.load('{path}', weights_only=False), '{out}')\"` and name {out}")


def _hf_convert_hint(folder: Path) -> str:
    return (f"`python -c \"from transformers import AutoModel; AutoModel.from_pretrained('{folder}', "
            f"use_safetensors=False).save_pretrained('{folder}', safe_serialization=True)\"` "
            "(run it only where you trust the file)")


def read_weights(path: Path) -> dict[str, torch.Tensor]:
    """A state dict from a .safetensors file, or a .pt/.pth that torch's loader reads with weights_only=True; a file that
    needs full unpickling is refused with the line that converts it."""
    path = Path(path)
    if path.suffix.lower() == ".safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(str(path), device="cpu")
        except Exception as err:  # safetensors raises its own SafetensorError
            raise TowerError(f"{path} is not a readable safetensors file ({_first_line(err)})") from None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # pickle.UnpicklingError (a class outside the allow-list) or a damaged file
        raise TowerError(f"{path} needs full unpickling (it can run code), and fedafd loads weights with "
                         f"weights_only=True only ({_first_line(err)}); {_convert_pickle_hint(path)}") from None
    if isinstance(state, dict):
        for wrapper in ("state_dict", "model"):
            if isinstance(state.get(wrapper), dict):
                state = state[wrapper]
                break
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise TowerError(f"{path} is not a state dict (name -> tensor); save model.state_dict() as .safetensors")
    return state


def _first_line(err: BaseException) -> str:
    return (str(err).strip().splitlines() or [type(err).__name__])[0]


def _hf_weights(folder: Path) -> list[Path]:
    """The safetensors files of an hf folder, or TowerError before anything is loaded."""
    files = sorted(folder.glob("*.safetensors"))
    if files:
        return files
    other_formats = (".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack")
    pickled = [p.name for p in sorted(folder.iterdir()) if p.suffix in other_formats]
    if pickled:
        raise TowerError(f"{folder} has only {', '.join(pickled)} (pickle or another framework's format), and fedafd "
                         f"loads safetensors only; convert it once: {_hf_convert_hint(folder)}")
    raise TowerError(f"{folder} has no model.safetensors")


@contextlib.contextmanager
def _quiet_hf() -> Iterator[None]:
    """No "Loading weights" bar from every process that loads a tower."""
    from transformers.utils import logging as hf_logging

    was_on = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_on:
            hf_logging.enable_progress_bar()


def _load_hf(spec: TowerSpec) -> nn.Module:
    folder = Path(spec.path).expanduser()
    _hf_weights(folder)
    try:
        from transformers import AutoModel
    except ImportError:
        raise TowerError("hf towers need transformers: pip install 'transformers>=4.40'") from None
    from safetensors import SafetensorError

    with _quiet_hf():
        try:
            model, info = AutoModel.from_pretrained(str(folder), local_files_only=True, use_safetensors=True,
                                                    output_loading_info=True)
        except (OSError, ValueError, KeyError, SafetensorError) as err:  # SafetensorError: a damaged weights file
            raise TowerError(f"{folder} does not load ({_first_line(err)})") from None
    # Missing keys would keep their random initial values: refused (a pooler the spec does not read aside).
    # Unexpected keys are allowed: a checkpoint saved from a task class (BertForMaskedLM) carries its head.
    missing = [key for key in info.get("missing_keys", ())
               if spec.pooling == "pooler" or not str(key).startswith("pooler.")]
    mismatched = [str(k[0]) if isinstance(k, tuple) else str(k) for k in info.get("mismatched_keys", ())]
    if missing or mismatched:
        raise TowerError(f"{folder}: the weights do not match the model's keys: {len(missing)} missing "
                         f"({', '.join(map(str, missing[:3]))}), {len(mismatched)} of another shape "
                         f"({', '.join(mismatched[:3])})")
    return model.float()


def _drop_last_linear(net: nn.Module) -> int:
    """Replace the classifier (the last nn.Linear) by Identity; returns the feature width it read."""
    linears = [(name, m) for name, m in net.named_modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise TowerError(f"{type(net).__name__} has no linear classifier to drop")
    name, linear = linears[-1]
    parent_name, _, child = name.rpartition(".")
    setattr(net.get_submodule(parent_name) if parent_name else net, child, nn.Identity())
    return linear.in_features


def _load_torchvision(spec: TowerSpec) -> tuple[nn.Module, int]:
    try:
        import torchvision
    except Exception as err:  # ImportError, or RuntimeError from a torchvision built for another torch
        raise TowerError(f"torchvision towers need torchvision ({_first_line(err)}): {TORCHVISION_HINT}") from None
    try:
        net = torchvision.models.get_model(spec.arch, weights=None)
    except (ValueError, KeyError):
        raise TowerError(f"torchvision has no architecture {spec.arch!r} (torchvision.models.list_models() names "
                         "them)") from None
    state = read_weights(Path(spec.path).expanduser())
    check_keys(net, state, f"{spec.path} ({spec.arch})")
    net.load_state_dict(state, strict=True)
    return net, _drop_last_linear(net)


def _load_timm(spec: TowerSpec) -> tuple[nn.Module, int]:
    try:
        import timm
    except ImportError:
        raise TowerError(f"timm towers need timm: {TIMM_HINT}") from None
    if not timm.is_model(spec.arch):
        raise TowerError(f"timm has no architecture {spec.arch!r} (timm.list_models() names them)")
    net = timm.create_model(spec.arch, pretrained=False)
    state = read_weights(Path(spec.path).expanduser())
    check_keys(net, state, f"{spec.path} ({spec.arch})")
    net.load_state_dict(state, strict=True)
    net.reset_classifier(0)
    return net, int(net.num_features)


def pool(hidden: torch.Tensor, pooling: str, attention_mask: torch.Tensor | None = None,
         pooler_output: torch.Tensor | None = None) -> torch.Tensor:
    """A model's output -> (B, D): text hidden states (B, L, H) with their mask, a ViT's tokens (B, N, H) or a
    convolutional feature map (B, C, h, w)."""
    if pooling == "pooler":
        if pooler_output is None:
            raise TowerError("pooling pooler: this model has no pooler output; use mean or cls")
        return pooler_output.flatten(1)  # (B, D): ResNet's (B, C, 1, 1) too
    if hidden.dim() == 4:
        if pooling != "mean":
            raise TowerError(f"pooling {pooling}: a feature map (B, C, h, w) pools by mean or pooler")
        return hidden.mean(dim=(2, 3))  # (B, C)
    if pooling == "cls":
        return hidden[:, 0]  # (B, H)
    if attention_mask is None:
        return hidden.mean(dim=1)  # (B, H)
    mask = attention_mask.unsqueeze(-1).to(hidden.dtype)  # (B, L, 1)
    return (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1.0)  # (B, H)


class ImageTower(nn.Module):
    """Images float (B, 3, S, S) in [0, 1], S = spec.image_size -> features (B, D): normalised with the tower's
    mean and std, run, pooled."""

    def __init__(self, net: nn.Module, spec: TowerSpec, dim: int):
        super().__init__()
        self.net, self.spec, self.dim, self.hf = net, spec, dim, spec.source == "hf"
        self.register_buffer("mean", torch.tensor(spec.mean, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(spec.std, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        size = self.spec.image_size
        if images.dim() != 4 or images.shape[1] != 3 or images.shape[2] != size or images.shape[3] != size:
            raise TowerError(f"tower {self.spec.path} reads images (B, 3, {size}, {size}), got {tuple(images.shape)}; "
                             "bring them to its size first (fit_image)")
        x = (images - self.mean) / self.std  # (B, 3, S, S)
        if not self.hf:
            return self.net(x)  # (B, D): the classifier is dropped, the model pools itself
        out = self.net(pixel_values=x)
        return pool(out.last_hidden_state, self.spec.pooling, pooler_output=getattr(out, "pooler_output", None))


class TextTower(nn.Module):
    """Tokens (input_ids, attention_mask) int64 (B, L) from the tower's own tokenizer -> features (B, D), pooled."""

    def __init__(self, net: nn.Module, spec: TowerSpec, dim: int):
        super().__init__()
        self.net, self.spec, self.dim = net, spec, dim

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        if input_ids.dim() != 2 or input_ids.shape[1] > self.spec.max_tokens or attention_mask.shape != input_ids.shape:
            raise TowerError(f"tower {self.spec.path} reads (input_ids, attention_mask) (B, L <= "
                             f"{self.spec.max_tokens}) of one shape, got {tuple(input_ids.shape)} and "
                             f"{tuple(attention_mask.shape)}")
        out = self.net(input_ids=input_ids, attention_mask=attention_mask)
        return pool(out.last_hidden_state, self.spec.pooling, attention_mask, getattr(out, "pooler_output", None))


def _hf_dim(spec: TowerSpec) -> int | None:
    """Feature width from an hf config (a convolutional net's last stage, else hidden_size); None if it does not say."""
    config = _read_json(Path(spec.path).expanduser() / "config.json", "tower")
    if spec.modality == "image" and isinstance(config.get("hidden_sizes"), list):
        return int(config["hidden_sizes"][-1])
    if isinstance(config.get("hidden_size"), int):
        return int(config["hidden_size"])
    try:
        from transformers import AutoConfig

        hidden = getattr(AutoConfig.from_pretrained(spec.path, local_files_only=True), "hidden_size", None)
    except (OSError, ValueError, KeyError):
        return None
    return int(hidden) if isinstance(hidden, int) else None


def load_tower(spec: TowerSpec) -> nn.Module:
    """The tower as a module from its raw inputs to a (B, D) float32 feature, normalisation and pooling inside;
    frozen towers come in eval mode with gradients off, finetune ones with their last `finetune_blocks` blocks
    (all: 0) trainable (set_trainable). Its width is `module.dim`."""
    if spec.source == "builtin":
        raise TowerError(f"{spec.arch} is a shipped backbone: runtime.backbones.build_backbone builds it")
    if spec.source == "hf":
        net = _load_hf(spec)
        dim = _hf_dim(spec)
        tower_class = ImageTower if spec.modality == "image" else TextTower
        module = tower_class(net, spec, dim or 0)
        if dim is None:
            module.dim = _probe(module)
    else:
        net, dim = _load_torchvision(spec) if spec.source == "torchvision" else _load_timm(spec)
        module = ImageTower(net, spec, dim)
    if spec.train == "frozen":
        module.eval()
        for parameter in module.parameters():
            parameter.requires_grad_(False)
    else:
        set_trainable(module, spec)
    return module


def tower_blocks(net: nn.Module) -> list[nn.Module]:
    """A model's blocks in order, for finetune_blocks: its largest nn.ModuleList (a BERT's encoder.layer, a ViT's
    blocks; a ResNet's stages when they are one), else its top-level children that hold parameters (torchvision's
    ResNet: conv1, bn1, layer1..layer4)."""
    lists = [m for m in net.modules() if isinstance(m, nn.ModuleList) and len(m) > 1]
    if lists:
        return list(max(lists, key=lambda m: sum(p.numel() for p in m.parameters())))
    return [child for child in net.children() if any(True for _ in child.parameters())]


def set_trainable(module: nn.Module, spec: TowerSpec) -> None:
    """A finetune tower's trainable part: all of it (finetune_blocks 0), or its last finetune_blocks blocks
    (tower_blocks) with everything else frozen; refused when the model has fewer blocks than asked."""
    net = module.net
    if not spec.finetune_blocks:
        net.requires_grad_(True)
        return
    blocks = tower_blocks(net)
    if spec.finetune_blocks > len(blocks):
        raise TowerError(f"{spec.path}: finetune_blocks = {spec.finetune_blocks}, but the model has {len(blocks)} "
                         "blocks (tower_blocks)")
    net.requires_grad_(False)
    for block in blocks[-spec.finetune_blocks:]:
        block.requires_grad_(True)


def _probe(module: nn.Module) -> int:
    spec = module.spec
    with torch.no_grad():
        if spec.modality == "image":
            out = module(torch.zeros(1, 3, spec.image_size, spec.image_size))
        else:
            ones = torch.ones(1, 2, dtype=torch.long)
            out = module(ones, ones)
    return int(out.shape[-1])


def tower_dim(spec: TowerSpec) -> int:
    """Width D of the tower's feature: from the hf config where it says, else from the built tower."""
    if spec.source == "builtin":
        return 1280
    if spec.source == "hf":
        dim = _hf_dim(spec)
        if dim is not None:
            return dim
    return int(load_tower(spec).dim)


def load_tower_tokenizer(spec: TowerSpec) -> Any:
    """A text tower's own tokenizer, from its local folder only."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(spec.tokenizer or spec.path, local_files_only=True)
    except (OSError, ValueError) as err:
        raise TowerError(f"tokenizer in {spec.tokenizer or spec.path} does not load ({_first_line(err)})") from None


def fit_image(image: Any, spec: TowerSpec) -> np.ndarray:
    """A PIL picture at any size -> float32 (3, S, S) in [0, 1] as the tower's resize and crop say
    (runtime.data.images.fit_picture, which torch-free `infer` runs too)."""
    from fedafd.runtime.data.images import fit_picture

    return fit_picture(image, spec.image_size, spec.resize, spec.mean)


# --- digest ------------------------------------------------------------------------------------


def _weight_files(spec: TowerSpec) -> list[tuple[str, Path]]:
    path = Path(spec.path).expanduser()
    if spec.source == "hf":
        named = [("config.json", path / "config.json")] + [(p.name, p) for p in _hf_weights(path)]
        index = path / "model.safetensors.index.json"
        return named + ([(index.name, index)] if index.is_file() else [])
    return [("weights", path)]


def tower_digest(spec: TowerSpec) -> str:
    """sha256 naming what a tower's features depend on: its weight files' bytes (and an hf folder's config.json),
    its tokenizer files (those of TOKENIZER_FILES present) and its preprocessing fields. Two towers of the same
    name with other weights, tokenizer or preprocessing differ; the folder's location and the train regime do not
    count."""
    manifest = {"weights": {name: file_sha256(p) for name, p in _weight_files(spec)},
                "preprocessing": spec.preprocessing()}
    if spec.modality == "text":
        folder = Path(spec.tokenizer or spec.path).expanduser()
        manifest["tokenizer"] = {name: file_sha256(folder / name) for name in TOKENIZER_FILES
                                 if (folder / name).is_file()}
    return hashlib.sha256(json.dumps(manifest, sort_keys=True).encode()).hexdigest()
