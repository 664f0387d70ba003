"""What an upload gives away: a label-set inference attack on the devices of a finished federation.

    python -m fedafd.benchmarks.privacy RUN_DIR [RUN_DIR ...] --out benchmarks/results/privacy/attack.json

The attacker is the honest-but-curious server: it sees each device's kind and architectures (its Join), and
every round's upload, the device's local-encoder features of the public set (what metrics.jsonl and the uplink
give it; the server folds uploads and drops them, so the benchmark recomputes the last upload from the device's
saved state, which is exactly the model that made it). It wants each classification device's label set.

The attack (shadow devices and a meta-classifier, in the style of the property-inference literature):
- the attacker trains shadow devices of the target's kind and architecture, alone, on known label sets drawn
  from data of the same distribution that no device trains on (the task's test split), with the devices'
  budget;
- a device's features live in a space of its own (its own random initialisation), so the attack reads only what
  survives any rotation of that space: the cosine similarities between its features of PROBE_ROWS fixed
  public samples (the upper triangle of their Gram matrix, its "relational fingerprint");
- one ridge regression per class from fingerprints to "holds this class" (fit on the shadows), whose scores on
  the real devices rank their classes.

Reported against chance: per-class AUC over (device, class) pairs (chance 0.5) and top-k recovery (of a device
holding k classes, the share of its k best-scored classes it holds; chance k / C on average).

A membership test is not made: the uploads are features of the public set, computed by a model that never
takes a private sample as input at upload time, so "was x in the private set" has no per-sample signal to test
in an upload beyond what the label set already says (see docs/operations.md, Security).
"""

from __future__ import annotations

import json
import math
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated

import numpy as np
import torch
import torch.nn.functional as F
import typer

from fedafd.edge_client.model import GlobalTowers, LocalModel
from fedafd.edge_client.objectives import objective_for
from fedafd.edge_client.private_data import load_private_data
from fedafd.edge_client.privacy import PrivacyBudget, noisy_upload, upload_noise_generator
from fedafd.edge_client.state import ClientState, load_state
from fedafd.edge_client.training import Optimizers, prepare_round, train_private_round, train_round, uplink_features
from fedafd.runtime.backbones import modality_backbones
from fedafd.runtime.config import ClientConfig, build_config
from fedafd.runtime.data.modal import load_public_data, load_task_data
from fedafd.runtime.methods import MethodSettings
from fedafd.runtime.torch_utils import device_seed, seeded_generator
from fedafd.runtime.vocabulary import MODALITIES, MODALITIES_OF_KIND

PROBE_ROWS = 48
"""Public rows whose pairwise cosines form a device's fingerprint (48 rows: 1,128 numbers)."""
HOLDS_SHARE = 0.05
"""A device holds a class when at least this share of its private samples are of it."""
CPU = torch.device("cpu")


@dataclass(frozen=True)
class Defence:
    """What the devices did to their uploads and training (the attacker knows it and trains its shadows alike)."""

    dp_noise: float = 0.0
    """DP-SGD's noise multiplier (0: no DP-SGD)."""
    dp_clip: float = 1.0
    upload_noise: float = 0.0
    upload_clip: float = 1.0

    @staticmethod
    def of(config: ClientConfig) -> "Defence":
        return Defence(config.dp_noise if config.dp else 0.0, config.dp_clip, config.upload_noise, config.upload_clip)

    def upload(self, features: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        if not self.upload_noise:
            return features
        return noisy_upload({"f": features}, self.upload_clip, self.upload_noise, generator)["f"]


@dataclass
class Device:
    """What the attacker sees of one device (its fingerprint) and what it wants (its classes)."""

    client_id: str
    kind: str
    arch: str
    fingerprint: np.ndarray
    holds: np.ndarray  # (C,) bool
    defence: Defence = Defence()


def fingerprint(features: torch.Tensor, probe: torch.Tensor) -> np.ndarray:
    """The upper triangle of the cosine-similarity matrix of `features` (P, d) at the `probe` rows: the same for
    the features and any rotation of them."""
    f = F.normalize(features[probe].float(), dim=-1)
    gram = f @ f.T  # (k, k)
    upper = torch.triu_indices(len(probe), len(probe), offset=1)
    return gram[upper[0], upper[1]].numpy()


def holds_classes(labels: np.ndarray, classes: int) -> np.ndarray:
    return np.bincount(labels, minlength=classes) / max(len(labels), 1) >= HOLDS_SHARE


def probe_rows(public_size: int, seed: int = 0) -> torch.Tensor:
    return torch.from_numpy(np.sort(np.random.default_rng(seed).choice(public_size, PROBE_ROWS, replace=False)))


def real_devices(run_dir: Path, probe: torch.Tensor) -> list[Device]:
    """The classification devices of a finished run: each one's last upload, recomputed from its saved state,
    as a fingerprint, and its label set."""
    devices = []
    for folder in sorted((run_dir / "clients").iterdir()):
        values = json.loads((folder / "config.json").read_text())
        values.setdefault("head", "linear")  # states saved before the cosine head had the paper's linear one
        values.setdefault("fusion_lr", 0.0)  # and before GFF's own rate, one Adam group
        config = build_config(ClientConfig, values)
        if config.kind == "multimodal":
            continue
        modalities = MODALITIES_OF_KIND[config.kind]
        private = load_private_data(config, backbones=modality_backbones(modalities))
        meta = json.loads((folder / "client_state.json").read_text())
        model = LocalModel(config.kind, config.image_arch, config.text_arch, meta["feature_dim"], private.num_classes,
                           config.adapter_dropout, config.head, config.head_scale, "layer" if config.dp else "batch")
        optimizers = Optimizers.create(model, config.lr, config.disc_lr, config.fusion_lr)  # as the device saved them
        state = ClientState(model, optimizers, GlobalTowers(meta["feature_dim"], CPU))
        load_state(folder, state, {})
        public = load_public_data("train", modality_backbones(MODALITIES))
        (modality,) = modalities
        features = uplink_features(model, public, torch.arange(len(public)), CPU)[modality]
        # the last upload as it went up: with the device's own upload noise of that round
        features = Defence.of(config).upload(features, upload_noise_generator(device_seed(config.seed, config.partition),
                                                                              meta["last_round"]))
        arch = config.image_arch if modality == "image" else config.text_arch
        devices.append(Device(f"{run_dir.name}/{config.client_id}", config.kind, arch, fingerprint(features, probe),
                              holds_classes(private.train.labels, private.num_classes), Defence.of(config)))
    return devices


def shadow_devices(kind: str, archs: list[str], count: int, feature_dim: int, samples: int, epochs: int,
                   probe: torch.Tensor, seed: int, defence: Defence = Defence()) -> list[Device]:
    """`count` devices the attacker trains alone on the task's test split (data no device trains on), taking
    turns through `archs` (the targets' architectures, from their Joins), each on a random set of 1 to 3
    classes with the devices' sample budget and the devices' defence (DP-SGD with their noise and clip, upload
    noise); their fingerprints and label sets."""
    modalities = MODALITIES_OF_KIND[kind]
    aux = load_task_data(kind, "test", modality_backbones(modalities))
    public = load_public_data("train", modality_backbones(MODALITIES))
    classes = len(aux.class_names)
    rng = np.random.default_rng(seed)
    devices = []
    for index in range(count):
        arch = archs[index % len(archs)]
        chosen = rng.choice(classes, size=rng.integers(1, 4), replace=False)
        rows = rng.permutation(np.flatnonzero(np.isin(aux.labels, chosen)))[:samples]
        data = aux.select(rows)
        torch.manual_seed(seed * 10_007 + index)
        model = LocalModel(kind, arch, arch, feature_dim, classes, fusion_norm="layer" if defence.dp_noise else "batch")
        optimizers = Optimizers.create(model, 1e-3, 1e-4)
        round_ = prepare_round(model, optimizers, GlobalTowers(feature_dim, CPU), data, MethodSettings("local", uplink=False),
                               0, epochs, 64, seed + index, CPU)
        if defence.dp_noise:
            budget = PrivacyBudget(math.inf, 1e-5, defence.dp_noise, defence.dp_clip)
            train_private_round(objective_for(round_), budget, 1e-3, seed + index)
        else:
            train_round(objective_for(round_))
        (modality,) = modalities
        features = uplink_features(model, public, torch.arange(len(public)), CPU)[modality]
        features = defence.upload(features, seeded_generator(seed * 10_007 + index))
        devices.append(Device(f"shadow-{index}", kind, arch, fingerprint(features, probe), holds_classes(data.labels, classes)))
    return devices


def ridge_scores(train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray, ridge: float = 1.0) -> np.ndarray:
    """One ridge regression per class from standardised fingerprints to holding it (+1 / -1); scores (n_test, C)."""
    mean, std = train_x.mean(0), train_x.std(0) + 1e-8
    x = np.hstack([(train_x - mean) / std, np.ones((len(train_x), 1))])
    t = np.hstack([(test_x - mean) / std, np.ones((len(test_x), 1))])
    weights = np.linalg.solve(x.T @ x + ridge * np.eye(x.shape[1]), x.T @ np.where(train_y, 1.0, -1.0))
    return t @ weights


def auc(scores: np.ndarray, positive: np.ndarray) -> float | None:
    """Area under the ROC curve: the chance a random positive outscores a random negative (ties count half)."""
    pos, neg = scores[positive], scores[~positive]
    if not len(pos) or not len(neg):
        return None
    greater = (pos[:, None] > neg[None, :]).mean()
    ties = (pos[:, None] == neg[None, :]).mean()
    return float(greater + 0.5 * ties)


def cross_validated_auc(x: np.ndarray, y: np.ndarray, folds: int = 5) -> float | None:
    """The attack's AUC on held-out shadows (k-fold): what the fingerprint reveals when the targets are trained
    as the shadows are; the gap to the real devices' AUC is what the shadows fail to imitate."""
    order = np.arange(len(x))
    scores = np.zeros(y.shape)
    for fold in range(folds):
        test = order % folds == fold
        scores[test] = ridge_scores(x[~test], y[~test], x[test])
    return auc(scores.ravel(), y.ravel())


def top_k_recovery(scores: np.ndarray, holds: np.ndarray) -> tuple[float, float]:
    """(mean over devices of the share of a device's k best-scored classes that it holds, k = the classes it
    holds; the same for a random ranking, k / C)."""
    found, chance = [], []
    for row, truth in zip(scores, holds):
        k = int(truth.sum())
        found.append(truth[np.argsort(-row)[:k]].mean())
        chance.append(k / len(truth))
    return statistics.fmean(found), statistics.fmean(chance)


def attack(targets: list[Device], shadows: int, epochs: int, samples: int, probe: torch.Tensor, seed: int,
           feature_dim: int) -> dict[str, dict]:
    """Per kind: shadows trained like the targets (their architectures and defence), the ridge attack fit on
    them, and its success on the targets (AUC, top-k recovery) and on held-out shadows (cross-validated AUC)."""
    results = {}
    for kind in sorted({d.kind for d in targets}):
        group = [d for d in targets if d.kind == kind]
        archs = sorted({d.arch for d in group})
        defences = {d.defence for d in group}
        if len(defences) > 1:
            raise typer.BadParameter(f"the {kind} devices used different defences ({defences}); attack one at a time")
        (defence,) = defences
        typer.echo(f"{kind}: {len(group)} devices ({', '.join(archs)}), training {shadows} shadows", err=True)
        shadow = shadow_devices(kind, archs, shadows, feature_dim, samples, epochs, probe, seed, defence)
        shadow_x, shadow_y = np.stack([d.fingerprint for d in shadow]), np.stack([d.holds for d in shadow])
        scores = ridge_scores(shadow_x, shadow_y, np.stack([d.fingerprint for d in group]))
        holds = np.stack([d.holds for d in group])
        found, chance = top_k_recovery(scores, holds)
        results[kind] = {"devices": len(group), "architectures": archs, "auc": auc(scores.ravel(), holds.ravel()),
                         "top_k_recovery": found, "top_k_chance": chance,
                         "shadow_cv_auc": cross_validated_auc(shadow_x, shadow_y)}
        typer.echo(f"{kind}: AUC {results[kind]['auc']:.3f} (chance 0.5), top-k recovery {found:.3f} "
                   f"(chance {chance:.3f}); on held-out shadows AUC {results[kind]['shadow_cv_auc']:.3f}", err=True)
    return results


def main(
    runs: Annotated[list[Path], typer.Argument(help="Finished run folders (simulate or serve --local).")] = None,
    shadow_check: Annotated[list[str], typer.Option(help="KIND:ARCH, repeatable: only measure the attack on held-out "
                                                          "shadows of that kind and architecture (no run needed).")] = [],
    shadows: Annotated[int, typer.Option(help="Shadow devices per kind (taking turns through the targets' architectures).")] = 30,
    epochs: Annotated[int, typer.Option(help="Local epochs each shadow trains alone.")] = 10,
    samples: Annotated[int, typer.Option(help="Private samples of each shadow (the devices' max_private).")] = 100,
    seed: Annotated[int, typer.Option(help="The attacker's seed.")] = 0,
    out: Annotated[Path, typer.Option(help="JSON of the results.")] = Path("runs/bench/privacy/attack.json"),
) -> None:
    public_size = len(load_public_data("train"))
    probe = probe_rows(public_size, seed)
    if shadow_check:
        for item in shadow_check:
            kind, _, arch = item.partition(":")
            shadow = shadow_devices(kind, [arch], shadows, 256, samples, epochs, probe, seed)
            x, y = np.stack([d.fingerprint for d in shadow]), np.stack([d.holds for d in shadow])
            typer.echo(f"{kind}/{arch}: AUC on held-out shadows {cross_validated_auc(x, y):.3f} (chance 0.5)")
        return
    if not runs:
        raise typer.BadParameter("give run folders, or --shadow-check KIND:ARCH")
    targets = [device for run in runs for device in real_devices(run, probe)]
    feature_dim = json.loads((runs[0] / "config.json").read_text())["feature_dim"]
    results = attack(targets, shadows, epochs, samples, probe, seed, feature_dim)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"runs": [str(r) for r in runs], "shadows": shadows, "epochs": epochs, "seed": seed,
                               "probe_rows": PROBE_ROWS, "results": results}, indent=2) + "\n")


if __name__ == "__main__":
    typer.run(main)
