"""The method settings RoundStart carries: one typed, versioned structure that the server fills from its
strategy and the device reads as is, with no defaults of its own (a field missing or of the wrong type
is a wire error, not a silent fallback).

Each strategy is a recipe of these switches on the device (docs/strategies.md): FedAFD turns on BAA and
GFF; FedMD digests toward the consensus; FedGEMS and FedET digest toward the server's features; CreamFL
adds its contrastive regularisers; FedCMI trains an infiltration projector; LOCAL uploads nothing.
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass
from typing import Any

from fedafd.runtime.codecs import FEATURE_CODECS

SETTINGS_VERSION = 1
"""1: the first typed settings (strategy, BAA, GFF, digest, contrastive regularisers, infiltration)."""
STRATEGIES = ("fedafd", "local", "fedmd", "creamfl", "fedgems", "fedet", "fedcmi")
DIGEST_TARGETS = ("none", "consensus", "global")
LOCAL_INITS = ("random", "global")


class SettingsError(ValueError):
    """Method settings that this build cannot run; the message names the field."""


@dataclass(frozen=True)
class MethodSettings:
    strategy: str
    """Which method the server runs (for logs and reports; the switches below are what the device obeys)."""
    uplink: bool
    """Devices upload their public features (False: LOCAL, metrics only)."""
    feature_codec: str
    """Wire codec of the uploaded features."""
    local_init: str
    """random, or global: a local encoder starts as a copy of the server's tower of the same architecture."""
    baa: bool
    """FedAFD's bi-level adversarial alignment against the global public features."""
    beta: float
    """Weight of the adversarial losses."""
    real_label: float
    """The discriminators' target for real features (below 1: one-sided label smoothing)."""
    gff: bool
    """FedAFD's granularity-aware fusion of the local and the global feature."""
    digest: str
    """Before private training, one pass over the public set regressing the local features toward: none,
    consensus (last round's aggregated features, FedMD) or global (the server's, FedGEMS and FedET)."""
    digest_weight: float
    """Weight of the digest's MSE."""
    contrast_weight: float
    """Weight of CreamFL's inter- plus intra-modal contrastive regularisers on the public set (0: off)."""
    contrast_temperature: float
    """Temperature of those regularisers (and of FedCMI's infiltration distillation)."""
    infiltration_weight: float
    """Weight of FedCMI's infiltration projector loss on classification devices (0: off)."""
    dominant_modality: str
    """The modality whose global features FedCMI's infiltration projector is distilled toward."""

    def __post_init__(self) -> None:
        hints = typing.get_type_hints(type(self))
        for f in dataclasses.fields(self):
            value, want = getattr(self, f.name), hints[f.name]
            ok = isinstance(value, bool) if want is bool else (
                isinstance(value, (int, float)) and not isinstance(value, bool) if want is float else isinstance(value, want))
            if not ok:
                raise SettingsError(f"settings.{f.name} must be {want.__name__}, got {type(value).__name__}")
        for name, choices in (("strategy", STRATEGIES), ("feature_codec", FEATURE_CODECS),
                              ("local_init", LOCAL_INITS), ("digest", DIGEST_TARGETS),
                              ("dominant_modality", ("image", "text"))):
            if getattr(self, name) not in choices:
                raise SettingsError(f"settings.{name} is {getattr(self, name)!r}, must be one of {', '.join(choices)}")
        for name in ("beta", "digest_weight", "contrast_weight", "infiltration_weight"):
            if getattr(self, name) < 0:
                raise SettingsError(f"settings.{name} must be >= 0, got {getattr(self, name)}")
        if self.contrast_temperature <= 0:
            raise SettingsError(f"settings.contrast_temperature must be > 0, got {self.contrast_temperature}")
        if not self.uplink and (self.baa or self.gff or self.digest != "none" or self.contrast_weight
                                or self.infiltration_weight):
            raise SettingsError("settings without uplink (LOCAL) cannot switch on a federated part")

    @property
    def needs_global_features(self) -> bool:
        """Whether the device needs the server's global features G of the public set this round."""
        return self.baa or self.digest == "global" or self.contrast_weight > 0 or self.infiltration_weight > 0

    def to_wire(self) -> dict[str, Any]:
        return {"version": SETTINGS_VERSION, **dataclasses.asdict(self)}

    @classmethod
    def from_wire(cls, values: Any) -> "MethodSettings":
        if not isinstance(values, dict):
            raise SettingsError(f"settings must be a map, got {type(values).__name__}")
        version = values.get("version")
        if version != SETTINGS_VERSION:
            raise SettingsError(f"settings version {version!r}, this build reads version {SETTINGS_VERSION}")
        names = {f.name for f in dataclasses.fields(cls)}
        given = set(values) - {"version"}
        if given != names:
            missing, extra = sorted(names - given), sorted(given - names)
            raise SettingsError(f"settings fields differ: missing {missing}, unexpected {extra}")
        return cls(**{name: values[name] for name in names})
