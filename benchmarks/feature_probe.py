"""What the global feature f_g carries for a classification device's own task: a nearest-class-mean probe of f_l
(the device's encoder), f_g (the server's frozen tower it received) and z (GFF's fusion), read back from the
saved states of a finished `simulate` run.

    python -m fedafd.benchmarks.feature_probe runs/afd/seed100 runs/afd/seed101

For each image and text device: class means of the L2-normalised features of its private training samples; each
test sample goes to the nearest mean by cosine, among the classes the device holds; the personalised top-1
(runtime.retrieval.personalised_accuracy) of each feature, beside the device's own head on z. Means by kind and
device architecture over the runs. No training, no hyperparameters: a probe of what each feature separates.
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path
from typing import Annotated

import torch
import torch.nn.functional as F
import typer

from fedafd.edge_client.model import GlobalTowers, LocalModel, saved_model_options
from fedafd.edge_client.private_data import load_private_data
from fedafd.edge_client.training import encode_all
from fedafd.runtime.backbones import modality_backbones
from fedafd.runtime.checkpoint import load_checkpoint
from fedafd.runtime.retrieval import personalised_accuracy
from fedafd.runtime.vocabulary import MODALITIES_OF_KIND

CPU = torch.device("cpu")


def ncm_predictions(train: torch.Tensor, train_labels: torch.Tensor, test: torch.Tensor, classes: int) -> torch.Tensor:
    """Nearest class mean by cosine, among the classes present in train_labels: (N,) class ids."""
    train, test = F.normalize(train, dim=1), F.normalize(test, dim=1)
    means = torch.zeros(classes, train.shape[1])
    means.index_add_(0, train_labels, train)
    present = torch.bincount(train_labels, minlength=classes) > 0
    scores = test @ F.normalize(means, dim=1).T  # (N, C)
    scores[:, ~present] = -float("inf")
    return scores.argmax(1)


@torch.no_grad()
def probe_device(state_dir: Path) -> dict | None:
    config = json.loads((state_dir / "config.json").read_text())
    if config["kind"] == "multimodal":
        return None
    tensors, meta = load_checkpoint(state_dir / "client_state.safetensors")
    (modality,) = MODALITIES_OF_KIND[config["kind"]]
    private = load_private_data(config["kind"], config["partition"], config["num_partitions"], config["alpha"],
                                config["seed"], config["max_private"], config["max_test"],
                                backbones=modality_backbones((modality,)))
    weights = tensors["model"]
    model = LocalModel(config["kind"], config["image_arch"], config["text_arch"], meta["feature_dim"],
                       private.num_classes, **saved_model_options(weights))
    model.load_state_dict(weights)
    model.eval()
    towers = GlobalTowers(meta["feature_dim"], CPU)
    towers.load(meta["tower_version"], meta["tower_archs"], tensors["towers"])
    features = {}
    for split, data in (("train", private.train), ("test", private.test)):
        local = encode_all(lambda rows: model.encode(modality, data, rows, CPU), len(data))
        global_ = encode_all(lambda rows: towers.encode(modality, data, rows, CPU), len(data))
        fused = model.fuse(modality, local, global_)
        features[split] = {"f_l": local, "f_g": global_, "z": fused, "logits": model.head(fused)}
    train_labels = torch.as_tensor(private.train.labels).long()
    test_labels = torch.as_tensor(private.test.labels).long()
    result = {"kind": config["kind"], "arch": config[f"{modality}_arch"]}
    for name in ("f_l", "f_g", "z"):
        predictions = ncm_predictions(features["train"][name], train_labels, features["test"][name], private.num_classes)
        result[name] = personalised_accuracy(predictions, test_labels, train_labels, private.num_classes)["pers_top1"]
    result["head_on_z"] = personalised_accuracy(features["test"]["logits"].argmax(1), test_labels, train_labels,
                                                private.num_classes)["pers_top1"]
    return result


def main(runs: Annotated[list[Path], typer.Argument(help="simulate run folders")]) -> None:
    rows: dict[tuple[str, str], list[dict]] = {}
    for run in runs:
        for state_dir in sorted(run.glob("clients/*")):
            result = probe_device(state_dir)
            if result is not None:
                rows.setdefault((result["kind"], result["arch"]), []).append(result)
    typer.echo("| kind | device encoder | devices | NCM on f_l | NCM on f_g | NCM on z | head on z |")
    typer.echo("|---|---|---|---|---|---|---|")
    for (kind, arch), results in sorted(rows.items()):
        cells = [f"{statistics.mean(r[k] for r in results):.1f}" for k in ("f_l", "f_g", "z", "head_on_z")]
        typer.echo(f"| {kind} | {arch} | {len(results)} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    typer.run(main)
