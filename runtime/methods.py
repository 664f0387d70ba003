"""The method settings RoundStart carries: one typed, versioned structure, the one definition of every
method switch and its default (off). The server's strategy sets the fields its method turns on; the device
trains from it as is (a field missing or of the wrong type on the wire is an error, not a silent fallback).
`needs()` says what a round of these settings needs besides them, for both sides.

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

SETTINGS_VERSION = 2
"""1: the first typed settings (strategy, BAA, GFF, digest, contrastive regularisers, infiltration);
2: BAA's schedule (baa_schedule, baa_batches, disc_steps)."""
STRATEGIES = ("fedafd", "local", "fedmd", "creamfl", "fedgems", "fedet", "fedcmi")
DIGEST_TARGETS = ("none", "consensus", "global")
LOCAL_INITS = ("random", "global")
BAA_SCHEDULES = ("pass", "paired")


def method_class(package: str, name: str, base: type):
    """The subclass of `base` called `name` (its `name` attribute) in module `package.name`: how the server finds a
    method's strategy and the device its objective, by the name in the settings."""
    import importlib

    if name not in STRATEGIES:
        raise ValueError(f"unknown method {name!r}; known: {', '.join(STRATEGIES)}")
    module = importlib.import_module(f"{package}.{name}")
    (cls,) = [c for c in vars(module).values() if isinstance(c, type) and issubclass(c, base) and c.name == name]
    return cls


class SettingsError(ValueError):
    """Method settings that this build cannot run; the message names the field."""


@dataclass(frozen=True)
class RoundNeeds:
    """What a device needs for a round besides the settings; the server sends it, the device expects it."""

    global_features: bool
    """G, the server's (P, d) public features of both modalities (sent, or computed on the device from towers)."""
    towers: bool
    """The frozen global towers of the device's own modalities (GFF's f_g)."""
    consensus: bool
    """Last round's teachers (FedMD)."""


@dataclass(frozen=True)
class MethodSettings:
    strategy: str
    """Which method the server runs: the device trains with that method's objective (edge_client/objectives)."""
    uplink: bool = True
    """Devices upload their public features (False: LOCAL, metrics only)."""
    feature_codec: str = "fp32"
    """Wire codec of the uploaded features."""
    local_init: str = "random"
    """random, or global: a local encoder starts as a copy of the server's tower of the same architecture."""
    baa: bool = False
    """FedAFD's bi-level adversarial alignment against the global public features."""
    beta: float = 0.0
    """Weight of the adversarial losses."""
    real_label: float = 1.0
    """The discriminators' target for real features (below 1: one-sided label smoothing)."""
    baa_schedule: str = "paired"
    """pass: each local epoch starts with an adversarial pass over the public pairs (one discriminator step, one
    encoder step per public batch), then the private pass; paired: each private step is paired with one public batch."""
    baa_batches: int = 0
    """Public batches in each adversarial pass (0: every batch of the public set, a whole pass)."""
    disc_steps: int = 1
    """Discriminator steps per public batch before the encoder's step."""
    gff: bool = False
    """FedAFD's granularity-aware fusion of the local and the global feature."""
    digest: str = "none"
    """Before private training, one pass over the public set regressing the local features toward: none,
    consensus (last round's aggregated features, FedMD) or global (the server's, FedGEMS and FedET)."""
    digest_weight: float = 0.0
    """Weight of the digest's MSE."""
    contrast_weight: float = 0.0
    """Weight of CreamFL's inter- plus intra-modal contrastive regularisers on the public set (0: off)."""
    contrast_temperature: float = 1.0
    """Temperature of those regularisers (and of FedCMI's infiltration distillation)."""
    infiltration_weight: float = 0.0
    """Weight of FedCMI's infiltration projector loss on classification devices (0: off)."""
    dominant_modality: str = "text"
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
                              ("local_init", LOCAL_INITS), ("digest", DIGEST_TARGETS), ("baa_schedule", BAA_SCHEDULES),
                              ("dominant_modality", ("image", "text"))):
            if getattr(self, name) not in choices:
                raise SettingsError(f"settings.{name} is {getattr(self, name)!r}, must be one of {', '.join(choices)}")
        if self.baa_batches < 0 or self.disc_steps < 1:
            raise SettingsError(f"settings.baa_batches must be >= 0 and disc_steps >= 1, got {self.baa_batches}, "
                                f"{self.disc_steps}")
        for name in ("beta", "digest_weight", "contrast_weight", "infiltration_weight"):
            if getattr(self, name) < 0:
                raise SettingsError(f"settings.{name} must be >= 0, got {getattr(self, name)}")
        if self.contrast_temperature <= 0:
            raise SettingsError(f"settings.contrast_temperature must be > 0, got {self.contrast_temperature}")
        if not self.uplink and (self.baa or self.gff or self.digest != "none" or self.contrast_weight
                                or self.infiltration_weight):
            raise SettingsError("settings without uplink (LOCAL) cannot switch on a federated part")

    def needs(self) -> RoundNeeds:
        """What a round of these settings needs: G for BAA, a digest toward the server, CreamFL's and FedCMI's
        regularisers; the towers for GFF; the consensus for FedMD's digest."""
        return RoundNeeds(
            global_features=(self.baa or self.digest == "global" or self.contrast_weight > 0
                             or self.infiltration_weight > 0),
            towers=self.gff,
            consensus=self.digest == "consensus",
        )

    def dp_conflict(self) -> str:
        """Why a differentially private device cannot train these settings ("" when it can): DP-SGD covers the
        private steps only, so nothing may read private data outside them or bring public rows into them."""
        if self.baa and self.baa_schedule == "paired":
            return ("BAA's paired schedule puts public rows into each private step; set baa_schedule=pass (adversarial "
                    "passes over the public set, no privacy cost) or baa=false")
        if self.infiltration_weight > 0:
            return ("FedCMI's class temperatures read the private data outside the private steps; set "
                    "infiltration_weight=0")
        return ""

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
