"""Typed configuration for both processes: defaults in code, an optional TOML file, `-c key=value` overrides.

Every field has a default and a one-line docstring. Unknown keys and bad values raise `ConfigError`
naming the key, so a typo never silently falls back to a default.
"""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, TypeVar

from fedafd.runtime.codecs import FEATURE_CODECS
from fedafd.runtime.methods import BAA_SCHEDULES, LOCAL_INITS, STRATEGIES
from fedafd.runtime.tomlfile import read_toml
from fedafd.runtime.vocabulary import CLIENT_KINDS

CONTRASTIVE_LOSSES = ("pcme", "infonce")
CLASSIFIER_HEADS = ("cosine", "linear")
DEVICES = ("auto", "cpu", "cuda")
DEVICE_REGIMES = ("mixed", "paper", "adapters")
"""cloud_server.fleet.DEVICE_REGIMES says which architectures each regime's devices take turns through."""
TOWER_CODECS = ("fp32", "fp16", "int8_row")


class ConfigError(ValueError):
    """A config value or key is wrong; the message names the key."""


@dataclass
class PartitionKeys:
    """How a pool's rows are split among the devices of a kind: the same keys on the server (for its --local and
    simulated devices) and on a device (its share of a pool), named as Flower Datasets names them."""

    partitioner: str = "dirichlet_legacy"
    """How a pool's rows are split among the devices of a kind: Flower Datasets' iid, dirichlet (alpha, min_partition_size, self_balancing), shard, pathological, natural (the data config's natural_id_column); or dirichlet_legacy (fedafd's own Dirichlet split, the demo's)."""
    min_partition_size: int = 10
    """dirichlet, dirichlet_legacy: draw again until every device holds at least this many rows (Flower's min_partition_size)."""
    self_balancing: bool = False
    """dirichlet: stop giving a class's rows to devices already above the average size (Flower's self_balancing)."""
    num_shards_per_partition: int = 0
    """shard: shards each device gets (0: from shard_size; Flower's num_shards_per_partition)."""
    shard_size: int = 0
    """shard: rows per shard (0: from num_shards_per_partition; Flower's shard_size)."""
    keep_incomplete_shard: bool = False
    """shard: keep the last, smaller shard of a class instead of leaving its rows out (Flower's keep_incomplete_shard)."""
    num_classes_per_partition: int = 2
    """pathological: classes each device holds (Flower's num_classes_per_partition)."""
    class_assignment_mode: str = "random"
    """pathological: how classes are given to devices: random, deterministic or first-deterministic (Flower's)."""


@dataclass
class ServerConfig(PartitionKeys):
    """What the cloud server runs: the federation's method settings live here and reach clients in RoundStart."""

    PATH_KEYS: ClassVar[tuple[str, ...]] = (
        "public_data", "public_data_config", "public_subset", "eval_data", "eval_data_config", "image_data",
        "text_data", "multimodal_data", "image_data_config", "text_data_config", "multimodal_data_config")
    """Keys that name files: in a TOML file, a relative path is read from the TOML's folder."""

    rounds: int = 3
    """Number of federated rounds."""
    min_clients: int = 1
    """Fewest joined clients to start with; fewer after join_timeout_s is an error."""
    expected_clients: int = 0
    """Start as soon as this many clients joined (0: once min_clients joined and none joined for join_settle_s; --local sets it)."""
    join_timeout_s: float = 300.0
    """Longest wait for clients to join; then start with at least min_clients (or fail)."""
    join_settle_s: float = 10.0
    """With expected_clients 0: start once min_clients joined and no other client joined for this many seconds."""
    round_deadline_s: float = 1800.0
    """Seconds after RoundStart by which uploads must arrive; later ones are cut."""
    heartbeat_timeout_s: float = 120.0
    """A client silent (no heartbeat, no upload) for this long is counted as dropped for the round."""
    quorum: float = 0.5
    """Fraction of the round's clients whose uploads must arrive for the round to count."""
    local_epochs: int = 2
    """Local epochs E each client trains per round (paper: 5)."""
    seed: int = 0
    """Seed for the server's models, public subset and client partitions."""
    device: str = "auto"
    """Torch device for the server: auto (cuda if available), cpu or cuda."""
    threads: int = 0
    """Torch CPU threads for the server (0: torch's default)."""
    feature_dim: int = 256
    """Width d of every encoder's feature (paper: 256)."""
    public_size: int = 0
    """Number of public pairs P used every round (0: the whole public train split)."""
    image_arch: str = "effnet_linear"
    """Server's global image tower (runtime.models.IMAGE_ARCHS; default: an adapter over frozen EfficientNet-Lite0)."""
    text_arch: str = "minilm_linear"
    """Server's global text tower (runtime.models.TEXT_ARCHS; default: an adapter over frozen all-MiniLM-L6-v2)."""
    image_tower: str = ""
    """A pretrained image model of your own under the server's image adapter, instead of EfficientNet-Lite0: hf:FOLDER, torchvision:ARCH:WEIGHTS, timm:ARCH:WEIGHTS, or a TOML table (docs/towers.md)."""
    text_tower: str = ""
    """A pretrained text model of your own under the server's text adapter, instead of all-MiniLM-L6-v2: hf:FOLDER or a TOML table (docs/towers.md)."""
    adapter_dropout: float = 0.5
    """Dropout on the backbone features the server's adapters read (training only)."""
    contrastive_loss: str = "infonce"
    """Stage-1 loss: infonce (CLIP's; default, it learns faster here) or pcme (the paper's soft contrastive)."""
    server_epochs: int = 2
    """Stage-1 epochs over the public set per round."""
    distill_epochs: int = 1
    """Stage-3 distillation epochs over the public set per round."""
    gamma: float = 0.4
    """Weight of the distillation MSE (paper: 0.4)."""
    distill_target: str = "features"
    """What stage 3 distils: features (the teacher's own, MSE; docs/method.md) or relations (the teacher's cosine similarities within each batch, MSE)."""
    batch_size: int = 64
    """Server batch size for stage 1, stage 3 and feature extraction."""
    lr: float = 1e-3
    """Server Adam learning rate of stage 1."""
    distill_lr: float = 1e-5
    """Adam learning rate of stage 3 (its own optimiser: distillation and contrastive training keep separate moments)."""
    sed_chunk: int = 512
    """Rows per chunk when computing SED scores (memory O(chunk x P))."""
    sed_temperature: float = 0.1
    """Temperature dividing SED's cosine similarities (1: docs/method.md's form; 0.1 measured best: docs/learning.md H4)."""
    strategy: str = "fedafd"
    """The method: fedafd, local (no federation) or one of the paper's baselines; runtime.methods.STRATEGIES lists them all (docs/strategies.md)."""
    baa: bool = False
    """Bi-level adversarial alignment on the clients: the paper's method has it on; off measured better on every device kind here (docs/learning.md H3, H7)."""
    gff: bool = True
    """Granularity-aware feature fusion on the clients (ablation switch)."""
    sed: bool = True
    """Similarity-guided ensemble distillation; off: distil toward the plain mean (ablation switch)."""
    beta: float = 0.5
    """Weight of the adversarial losses (paper: 0.5)."""
    baa_schedule: str = "paired"
    """BAA's schedule: paired (one public batch per private step; measured level with pass, at half the cost: docs/learning.md H3) or pass (each local epoch, an adversarial pass over the public pairs, one discriminator and one encoder step per batch, then the private pass; the research code's)."""
    baa_batches: int = 0
    """Public batches in each epoch's adversarial pass (0: the whole public set)."""
    disc_steps: int = 1
    """Discriminator steps per public batch before each encoder step."""
    local_init: str = "random"
    """How a device's local encoders start: random, or global (a copy of the server's tower where the architecture is the same)."""
    real_label: float = 1.0
    """Discriminators' target for real (global) features; below 1 is one-sided label smoothing (paper: 1)."""
    alpha: float = 0.1
    """Dirichlet concentration of the non-IID client partitions (--local; paper: 0.1)."""
    public_data: str = ""
    """The public image-text set P that the server trains on and every device holds: a path (COCO or Karpathy JSON, metadata.jsonl folder, CSV/JSONL table, parquet, save_to_disk) or demo:NAME ("": demo:emoji). Devices must hold the same (checked by digest at join)."""
    public_data_config: str = ""
    """Data config TOML of public_data (column mapping, format, splits: docs/data.md)."""
    public_subset: str = ""
    """File of row ids (one per line, or a JSON list) of public_data's train rows that make P (like the paper's 10k COCO subset; "": every row)."""
    eval_data: str = ""
    """The server's retrieval test set ("": public_data's test split). Its pictures must not be in the public set."""
    eval_data_config: str = ""
    """Data config TOML of eval_data."""
    image_data: str = ""
    """--local/simulate: the pool the image devices split with the partitioner ("": demo:fashion_mnist)."""
    text_data: str = ""
    """--local/simulate: the pool the text devices split ("": demo:wordnet)."""
    multimodal_data: str = ""
    """--local/simulate: the pool of image-text pairs the retrieval devices split ("": demo:tuxpaint)."""
    image_data_config: str = ""
    """Data config TOML of image_data."""
    text_data_config: str = ""
    """Data config TOML of text_data."""
    multimodal_data_config: str = ""
    """Data config TOML of multimodal_data."""
    test_fraction: float = 0.2
    """Share of a pool's rows held out (stratified, seeded) as its devices' test rows when the pool has no test split."""
    on_bad_sample: str = "error"
    """A bad row in any data set: error (stop, naming the file and row) or skip (leave it out, counted in the metrics)."""
    max_private: int = 2000
    """Cap on each --local client's private training samples (0: no cap); a kind of one device holds its whole pool."""
    max_test: int = 1000
    """Cap on each --local client's test samples (0: the whole test split)."""
    device_regime: str = "mixed"
    """Architectures of --local and simulated devices: mixed (adapters and small nets from scratch), paper (every device a small net from scratch, smaller than the server's towers) or adapters (every device an adapter over the frozen backbones)."""
    feature_codec: str = "fp32"
    """How public features travel both ways (uplink features, downlink global features): fp32, fp16, int8_row, int8_col."""
    tower_codec: str = "fp16"
    """How the downlink's global tower weights travel: fp32, fp16 or int8_row (int8 per output row; 1-d tensors fp16)."""
    public_resample: bool = False
    """Draw a fresh random subset of public_size pairs every round (same rows for every client; paper: one fixed subset)."""
    worker_timeout_s: float = 300.0
    """With several server ranks (serve --workers N): seconds a rank waits for the others within a stage before the round fails."""

    def validate(self) -> None:
        _check_choice(self, "feature_codec", FEATURE_CODECS)
        _check_choice(self, "tower_codec", TOWER_CODECS)
        _check_positive(self, "rounds", "min_clients", "local_epochs", "feature_dim", "server_epochs",
                        "batch_size", "sed_chunk")
        _check_non_negative(self, "expected_clients", "join_settle_s", "public_size", "distill_epochs", "threads",
                            "max_private", "max_test", "gamma", "beta")
        _check_positive(self, "join_timeout_s", "round_deadline_s", "heartbeat_timeout_s", "lr", "distill_lr", "alpha",
                        "sed_temperature",
                        "worker_timeout_s")
        _check_fraction(self, "adapter_dropout")
        if not 0.5 < self.real_label <= 1.0:
            raise ConfigError(f"real_label must be in (0.5, 1], got {self.real_label}")
        _check_choice(self, "device", DEVICES)
        _check_choice(self, "strategy", STRATEGIES)
        if self.strategy == "fedmd" and self.public_resample:
            raise ConfigError("strategy fedmd sends last round's consensus of the public rows: it needs public_resample=false")
        _check_choice(self, "contrastive_loss", CONTRASTIVE_LOSSES)
        _check_choice(self, "local_init", LOCAL_INITS)
        _check_choice(self, "baa_schedule", BAA_SCHEDULES)
        _check_choice(self, "distill_target", ("features", "relations"))
        _check_choice(self, "device_regime", DEVICE_REGIMES)
        _check_non_negative(self, "baa_batches")
        _check_positive(self, "disc_steps")
        _check_data_keys(self)
        if not 0.0 < self.quorum <= 1.0:
            raise ConfigError(f"quorum must be in (0, 1], got {self.quorum}")
        if self.feature_dim % 4:
            raise ConfigError(f"feature_dim must be divisible by 4 (fusion bottleneck d/4), got {self.feature_dim}")
        _check_towers(self)


@dataclass
class ClientConfig(PartitionKeys):
    """What one edge device runs: its data, its model, its hardware. Method settings come from the server."""

    PATH_KEYS: ClassVar[tuple[str, ...]] = ("data", "data_config", "test_data", "public_data", "public_data_config")
    """Keys that name files: in a TOML file, a relative path is read from the TOML's folder."""

    kind: str = "image"
    """Task of this device: image (classification), text (classification) or multimodal (retrieval)."""
    client_id: str = ""
    """Unique id of this device (default: KIND-PARTITION)."""
    partition: int = 0
    """Which share of the non-IID split this device holds (0-based)."""
    num_partitions: int = 1
    """How many devices of this kind share the data set."""
    alpha: float = 0.1
    """Dirichlet concentration of the non-IID split (must match the other devices of this kind)."""
    data: str = ""
    """This device's own data: a path (ImageFolder, CSV/TSV/JSONL, CIFAR binary, .npz, COCO/Karpathy JSON, metadata.jsonl folder, parquet, save_to_disk) or demo:NAME; it holds exactly those rows (with num_partitions > 1: its share of them as a pool). "": its kind's bundled set, shared among num_partitions devices."""
    data_format: str = "auto"
    """The format of data (auto: told from the path; docs/data.md lists them)."""
    data_config: str = ""
    """Data config TOML of data: column and label mapping, splits (docs/data.md)."""
    test_data: str = ""
    """This device's test rows, when data has no test split ("": test_fraction of data)."""
    test_fraction: float = 0.2
    """Share of data's rows held out (stratified, seeded) as test rows when it has no test split and no test_data is given."""
    on_bad_sample: str = "error"
    """A bad row in the data: error (stop, naming the file and row) or skip (leave it out, counted in the metrics)."""
    public_data: str = ""
    """The public image-text set, the same the server trains on ("": demo:emoji; the server checks its digest at join)."""
    public_data_config: str = ""
    """Data config TOML of public_data."""
    seed: int = 0
    """Seed of the split and of this device's models (must match the other devices for the split)."""
    max_private: int = 2000
    """Cap on private training samples of a share (of a pool, or of the bundled set; 0: the whole share); a device's own data (data, num_partitions 1) is never capped."""
    max_test: int = 1000
    """Cap on test samples of a share's test split (0: the whole test split); own data's test rows are never capped."""
    image_arch: str = "effnet_linear"
    """Local image encoder (image and multimodal devices; runtime.models.IMAGE_ARCHS)."""
    text_arch: str = "minilm_linear"
    """Local text encoder (text and multimodal devices; runtime.models.TEXT_ARCHS)."""
    image_tower: str = ""
    """A pretrained image model of this device's own under its image adapter, instead of EfficientNet-Lite0: hf:FOLDER, torchvision:ARCH:WEIGHTS, timm:ARCH:WEIGHTS or a TOML table (docs/towers.md)."""
    text_tower: str = ""
    """A pretrained text model of this device's own under its text adapter, instead of all-MiniLM-L6-v2: hf:FOLDER or a TOML table."""
    server_image_tower: str = ""
    """The server's image_tower, when it names one: this device runs the server's image tower too (the same files; checked at join)."""
    server_text_tower: str = ""
    """The server's text_tower, when it names one (the same files; checked at join)."""
    adapter_dropout: float = 0.5
    """Dropout on the backbone features a local adapter reads (training only)."""
    batch_size: int = 64
    """Batch size for local training."""
    lr: float = 1e-3
    """Adam learning rate of the local model, heads and fusion."""
    fusion_lr: float = 3e-2
    """Adam learning rate of GFF's gates (0: lr, the paper's one rate); 3e-2 measured best (docs/learning.md H10)."""
    local_task_weight: float = 0.0
    """Weight of a task loss on f_l alone beside the one on z, in rounds that fuse (0: the paper's loss on z only; docs/learning.md H14)."""
    disc_lr: float = 1e-4
    """Adam learning rate of the discriminators (the research code's 1e-4)."""
    head: str = "cosine"
    """Classification head: cosine (cosine similarities times a learnable logit scale) or linear (the paper's)."""
    head_scale: float = 16.0
    """Initial logit scale of the cosine head (learnable, capped at 100)."""
    device: str = "cpu"
    """Torch device: cpu, cuda or auto."""
    threads: int = 1
    """Torch CPU threads (1 keeps many devices on one machine from fighting over cores; 0: torch's default)."""
    heartbeat_s: float = 2.0
    """Seconds between heartbeats while training."""
    round_wait_s: float = 3600.0
    """Seconds to wait for the server's next message before giving up."""
    connect_timeout_s: float = 60.0
    """Seconds to wait for the server's Welcome after joining."""
    profile: str = ""
    """Device profile whose link to emulate (a shipped name such as phone_lte, or a TOML path; "": no shaping)."""
    dp: bool = False
    """Differential privacy: DP-SGD (Opacus) on everything that reads private data (classification devices, encoders Opacus can wrap)."""
    dp_epsilon: float = 8.0
    """DP budget epsilon: the device stops training (it still evaluates and uploads) before a round would spend more."""
    dp_delta: float = 1e-5
    """DP delta of the (epsilon, delta) guarantee (below 1 / the number of private samples, by convention)."""
    dp_clip: float = 1.0
    """DP-SGD's per-sample gradient norm bound C."""
    dp_noise: float = 1.0
    """DP-SGD's noise multiplier sigma (Gaussian noise of std sigma * C on each step's summed clipped gradients)."""
    upload_noise: float = 0.0
    """Std of Gaussian noise on each uploaded feature element, rows clipped to upload_clip first (0: off; no DP guarantee)."""
    upload_clip: float = 1.0
    """Row norm bound of the uploaded features when upload_noise > 0."""

    def validate(self) -> None:
        _check_choice(self, "kind", CLIENT_KINDS)
        _check_choice(self, "device", DEVICES)
        _check_positive(self, "num_partitions", "batch_size")
        _check_non_negative(self, "partition", "max_private", "max_test", "threads", "fusion_lr",
                            "local_task_weight")
        _check_positive(self, "alpha", "lr", "disc_lr", "heartbeat_s", "round_wait_s", "connect_timeout_s", "head_scale")
        _check_choice(self, "head", CLASSIFIER_HEADS)
        _check_fraction(self, "adapter_dropout")
        if self.partition >= self.num_partitions:
            raise ConfigError(f"partition must be < num_partitions ({self.num_partitions}), got {self.partition}")
        _check_towers(self)
        _check_non_negative(self, "upload_noise")
        _check_positive(self, "upload_clip")
        _check_data_keys(self)
        if self.data_format != "auto":
            from fedafd.runtime.data.sources.registry import FORMATS

            _check_choice(self, "data_format", ("auto", *FORMATS))
        if self.dp:
            self._validate_dp()
        if not self.client_id:
            self.client_id = f"{self.kind}-{self.partition}"
        if not self.client_id.replace("-", "").replace("_", "").isalnum() or len(self.client_id) > 64:
            raise ConfigError(f"client_id must be 1-64 letters, digits, '-' or '_', got {self.client_id!r}")

    def _validate_dp(self) -> None:
        """DP-SGD's settings, and whether this device's task and encoder can be trained with it at all."""
        _check_positive(self, "dp_epsilon", "dp_clip", "dp_noise")
        if not 0.0 < self.dp_delta < 1.0:
            raise ConfigError(f"dp_delta must be in (0, 1), got {self.dp_delta}")
        if self.kind == "multimodal":
            raise ConfigError("dp: retrieval devices cannot train with DP-SGD (their InfoNCE loss couples the samples of "
                              "a batch, so no per-sample gradient exists); use dp on image or text devices")
        from opacus.validators import ModuleValidator

        from fedafd.runtime.models import build_encoder

        key = f"{self.kind}_arch"
        arch = getattr(self, key)
        problems = ModuleValidator.validate(build_encoder(self.kind, arch, 8, self.adapter_dropout), strict=False)
        if problems:
            raise ConfigError(f"dp: {key}={arch} cannot be trained with DP-SGD ({str(problems[0]).split('. ')[0]}); "
                              f"pick an architecture Opacus can wrap: {', '.join(dp_archs(self.kind))}")


def dp_archs(kind: str) -> tuple[str, ...]:
    """The encoders of `kind` that Opacus can train with DP-SGD (no BatchNorm, no plain nn.GRU)."""
    from opacus.validators import ModuleValidator

    from fedafd.runtime.models import IMAGE_ARCHS, TEXT_ARCHS, build_encoder

    archs = IMAGE_ARCHS if kind == "image" else TEXT_ARCHS
    return tuple(a for a in archs if not ModuleValidator.validate(build_encoder(kind, a, 8), strict=False))


ConfigT = TypeVar("ConfigT", ServerConfig, ClientConfig)


def load_config(cls: type[ConfigT], path: Path | None = None, overrides: list[str] | None = None,
                **explicit: Any) -> ConfigT:
    """Defaults, then the TOML file, then `explicit` keyword values, then `key=value` overrides; validated."""
    values: dict[str, Any] = {}
    if path is not None:
        values = read_toml(Path(path), "config file", ConfigError)
        values = {key: relative_to(Path(path), value) if key in cls.PATH_KEYS
                  else tower_setting(value, Path(path)) if key in TOWER_KEYS else value
                  for key, value in values.items()}
    values.update({key: value for key, value in explicit.items() if value is not None})
    for item in overrides or []:
        key, sep, raw = item.partition("=")
        if not sep:
            raise ConfigError(f"override must look like key=value, got {item!r}")
        values[key.strip()] = raw.strip()
    return build_config(cls, values)


def relative_to(toml: Path, value: Any) -> Any:
    """A path written in a TOML file, read from that file's folder (absolute paths, demo:NAME and "" as they are)."""
    if not isinstance(value, str) or not value or value.startswith("demo:") or Path(value).expanduser().is_absolute():
        return value
    return str(toml.parent / value)


def build_config(cls: type[ConfigT], values: dict[str, Any]) -> ConfigT:
    """Typed construction: each value is converted to its field's type or rejected naming the key."""
    fields = {field.name: field for field in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    converted = {}
    for key, value in values.items():
        if key not in fields:
            raise ConfigError(f"unknown config key {key!r} for {cls.__name__}; valid keys: {', '.join(fields)}")
        converted[key] = _convert(key, tower_setting(value) if key in TOWER_KEYS else value, hints[key])
    config = cls(**converted)
    config.validate()
    return config


def config_to_dict(config: ServerConfig | ClientConfig) -> dict[str, Any]:
    return dataclasses.asdict(config)


def write_config(config: ServerConfig | ClientConfig, path: Path) -> None:
    """The effective config, as TOML-free JSON (readable back with build_config)."""
    path.write_text(json.dumps(config_to_dict(config), indent=2, sort_keys=True) + "\n")


def help_for(cls: type) -> dict[str, str]:
    """Field name -> its one-line docstring (read from the source), for CLI help and the README."""
    import ast
    import inspect

    docs: dict[str, str] = {}
    keys = {field.name for field in dataclasses.fields(cls)}  # not ClassVars such as PATH_KEYS
    for klass in reversed([k for k in cls.__mro__ if dataclasses.is_dataclass(k)]):  # inherited keys too
        body = ast.parse(inspect.getsource(klass)).body[0].body  # type: ignore[attr-defined]
        for node, following in zip(body, body[1:]):
            if isinstance(node, ast.AnnAssign) and isinstance(following, ast.Expr) \
                    and isinstance(following.value, ast.Constant) and isinstance(following.value.value, str) \
                    and node.target.id in keys:  # type: ignore[attr-defined]
                docs[node.target.id] = following.value.value  # type: ignore[attr-defined]
    return docs


def describe_config(cls: type) -> dict[str, dict[str, Any]]:
    """Key -> {type, default, help} in field order: what the CLIs' `config` commands list."""
    docs = help_for(cls)
    hints = typing.get_type_hints(cls)
    return {field.name: {"type": hints[field.name].__name__, "default": field.default, "help": docs[field.name]}
            for field in dataclasses.fields(cls)}


def _convert(key: str, value: Any, target: Any) -> Any:
    if isinstance(target, types.UnionType):
        target = next(arg for arg in typing.get_args(target) if arg is not type(None))
    if target is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "1", "yes", "on"):
            return True
        if isinstance(value, str) and value.lower() in ("false", "0", "no", "off"):
            return False
        raise ConfigError(f"{key} must be true or false, got {value!r}")
    if target is int:
        if isinstance(value, bool):
            raise ConfigError(f"{key} must be an integer, got {value!r}")
        if isinstance(value, int):
            return value
        try:
            return int(str(value))
        except ValueError:
            raise ConfigError(f"{key} must be an integer, got {value!r}") from None
    if target is float:
        if isinstance(value, bool):
            raise ConfigError(f"{key} must be a number, got {value!r}")
        try:
            return float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{key} must be a number, got {value!r}") from None
    if target is str:
        if not isinstance(value, (str, int, float)) or isinstance(value, bool):
            raise ConfigError(f"{key} must be a string, got {value!r}")
        return str(value)
    raise ConfigError(f"{key} has an unsupported type {target}")


TOWER_KEYS = ("image_tower", "text_tower", "server_image_tower", "server_text_tower")
"""Keys that name a tower: SOURCE:PATH, or a TOML table kept as its JSON (paths in it read from the TOML's folder)."""


def encoder_archs(config: ServerConfig | ClientConfig) -> dict[str, str]:
    """Modality -> the architecture its encoder is built with: image_arch / text_arch, or with image_tower /
    text_tower set, the same adapter over that tower (runtime.models.resolve_arch registers it)."""
    from fedafd.runtime.models import resolve_arch

    return {m: resolve_arch(m, getattr(config, f"{m}_arch"), getattr(config, f"{m}_tower")) for m in ("image", "text")}


def server_archs(config: ClientConfig) -> dict[str, str]:
    """A device's view of the server's towers it may be sent: modality -> the registered tower name of
    server_image_tower / server_text_tower (absent when unset)."""
    from fedafd.runtime.models import backbone_of, resolve_arch

    return {m: backbone_of(resolve_arch(m, "tower_linear", tower)) or ""
            for m in ("image", "text") if (tower := getattr(config, f"server_{m}_tower"))}


def _check_towers(config: ServerConfig | ClientConfig) -> None:
    """The architectures, and the tower settings (their form and keys: the files are read when a model is built,
    so a recipe naming another machine's folders parses anywhere)."""
    from fedafd.runtime.errors import FedafdError
    from fedafd.runtime.models import ADAPTERS, IMAGE_ARCHS, TEXT_ARCHS, TOWER_ADAPTERS
    from fedafd.runtime.towers import check_tower_setting

    _check_choice(config, "image_arch", IMAGE_ARCHS + tuple(TOWER_ADAPTERS))
    _check_choice(config, "text_arch", TEXT_ARCHS + tuple(TOWER_ADAPTERS))
    for modality in ("image", "text"):
        if getattr(config, f"{modality}_arch") in TOWER_ADAPTERS and not getattr(config, f"{modality}_tower"):
            raise ConfigError(f"{modality}_arch={getattr(config, f'{modality}_arch')} adapts a tower of your own: set "
                              f"{modality}_tower (e.g. {modality}_tower=hf:./my-model)")
    for key in TOWER_KEYS:
        value = getattr(config, key, "")
        if not value:
            continue
        try:
            check_tower_setting(value, key)  # the form and keys; the files are read when the tower is built
        except (ValueError, FedafdError) as err:
            raise ConfigError(str(err)) from None
        modality = key.removeprefix("server_").removesuffix("_tower")
        arch = getattr(config, f"{modality}_arch")
        if key == f"{modality}_tower" and not (arch in ADAPTERS or arch in TOWER_ADAPTERS):
            raise ConfigError(f"{key} is set but {modality}_arch={arch} trains from scratch on raw inputs and would not "
                              f"read it: pick an adapter ({modality}_arch=tower_linear or tower_mlp)")


def tower_setting(value: Any, toml: Path | None = None) -> str:
    """A tower key's value as a config keeps it: SOURCE:PATH as written, a table as its JSON; from a TOML file,
    relative paths (the short form's, a table's path and tokenizer) read from the TOML's folder."""
    if isinstance(value, dict):
        table = dict(value)
        if toml is not None:
            table.update({k: relative_to(toml, table[k]) for k in ("path", "tokenizer") if isinstance(table.get(k), str)})
        return json.dumps(table, sort_keys=True)
    if isinstance(value, str) and ":" in value and not value.lstrip().startswith("{"):
        head, _, path = value.rpartition(":")
        if toml is not None:
            return f"{head}:{relative_to(toml, path)}"
        if path and Path(path).expanduser().exists():  # absolute, so a child process elsewhere finds it too
            return f"{head}:{Path(path).expanduser().resolve()}"
    return value


def _check_data_keys(config: ServerConfig | ClientConfig) -> None:
    """The keys both sides share for reading and splitting data: the partitioner's, on_bad_sample, test_fraction."""
    from fedafd.runtime.data.partition import PARTITIONERS
    from fedafd.runtime.data.sources.records import ON_BAD_SAMPLE

    _check_choice(config, "on_bad_sample", ON_BAD_SAMPLE)
    if not 0.0 < config.test_fraction < 1.0:
        raise ConfigError(f"test_fraction must be in (0, 1), got {config.test_fraction}")
    _check_choice(config, "partitioner", PARTITIONERS)
    _check_non_negative(config, "min_partition_size", "num_shards_per_partition", "shard_size")
    _check_positive(config, "num_classes_per_partition")
    _check_choice(config, "class_assignment_mode", ("random", "deterministic", "first-deterministic"))


def _check_positive(config: object, *keys: str) -> None:
    for key in keys:
        if getattr(config, key) <= 0:
            raise ConfigError(f"{key} must be > 0, got {getattr(config, key)}")


def _check_non_negative(config: object, *keys: str) -> None:
    for key in keys:
        if getattr(config, key) < 0:
            raise ConfigError(f"{key} must be >= 0, got {getattr(config, key)}")


def _check_fraction(config: object, *keys: str) -> None:
    for key in keys:
        if not 0.0 <= getattr(config, key) < 1.0:
            raise ConfigError(f"{key} must be in [0, 1), got {getattr(config, key)}")


def _check_choice(config: object, key: str, choices: tuple[str, ...]) -> None:
    if getattr(config, key) not in choices:
        raise ConfigError(f"{key} must be one of {', '.join(choices)}; got {getattr(config, key)!r}")
