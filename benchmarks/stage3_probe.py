"""Stage 3 offline, on the state a FedAFD federation ended with: the server's checkpoint and every device's
saved model, read back from a `simulate` run folder. The devices' uploads are recomputed (the uplink's own
function), folded into SED's teacher at several temperatures, and one more stage 3 is run from the server's
final weights with each target, so SED's temperature and stage 3's form can be compared without a federation
per setting.

    python -m fedafd.benchmarks.stage3_probe runs/afd/seed100 runs/afd/seed101 --temperatures 1,0.1,0.03

For each run and temperature: the weights' normalised entropy and the teacher's cosine with G per modality;
for each target (features, relations), the server's R@1 sum on the public test split after one stage-3 epoch
at the run's gamma and distill_lr (or TARGET@LR's), minus before (a fresh Adam: the checkpoint's distillation moments are not
reused). One round's effect from the end state is a proxy for ten rounds' effect, nothing more.
"""

from __future__ import annotations

import copy
import json
import statistics
from pathlib import Path
from typing import Annotated

import numpy as np
import torch
import typer

from fedafd.cloud_server.checkpoint import load_server_checkpoint
from fedafd.cloud_server.distill import TeacherFold, sed_scores
from fedafd.cloud_server.stages import GlobalModel, distill_epoch, evaluate_retrieval, extract_features
from fedafd.edge_client.model import LocalModel, saved_model_options
from fedafd.edge_client.training import uplink_features
from fedafd.runtime.checkpoint import load_checkpoint
from fedafd.runtime.config import ServerConfig, build_config
from fedafd.runtime.data.modal import load_public_data
from fedafd.runtime.data.partition import cap_indices
from fedafd.runtime.diagnostics import mean_cosine
from fedafd.runtime.models import backbone_of
from fedafd.runtime.retrieval import retrieval_metrics
from fedafd.runtime.torch_utils import seeded_generator
from fedafd.runtime.vocabulary import MODALITIES

CPU = torch.device("cpu")


def device_models(run_dir: Path) -> dict[str, LocalModel]:
    """Client id -> the model its saved state holds."""
    models = {}
    for state_file in sorted(run_dir.glob("clients/*/client_state.safetensors")):
        tensors, meta = load_checkpoint(state_file)
        weights = tensors["model"]
        classes = int(weights["head.weight"].shape[0]) if "head.weight" in weights else 1
        model = LocalModel(meta["kind"], meta["image_arch"], meta["text_arch"], meta["feature_dim"], classes,
                           **saved_model_options(weights))
        model.load_state_dict(weights)
        models[meta["client_id"]] = model
    return models


def device_uploads(models: dict[str, LocalModel], public, rows: torch.Tensor) -> dict[str, dict[str, torch.Tensor]]:
    """Client id -> modality -> (P, d): what each device would upload from its saved model."""
    return {cid: uplink_features(model, public, rows, CPU) for cid, model in models.items()}


def r1_sum(features: dict[str, torch.Tensor]) -> float:
    """i2t + t2i R@1 of row-aligned image and text features (row i's image matches row i's caption)."""
    return retrieval_metrics(features["image"], features["text"], torch.arange(len(features["image"])))["r1_sum"]


def probe(run_dir: Path, temperatures: list[float], targets: list[str]) -> dict:
    config = build_config(ServerConfig, {k: v for k, v in json.loads((run_dir / "config.json").read_text()).items()})
    tensors, _meta = load_server_checkpoint(run_dir, "the probe")
    model = GlobalModel(config.image_arch, config.text_arch, config.feature_dim, config.contrastive_loss,
                        config.adapter_dropout)
    model.load_state_dict(tensors["model"])
    backbones = tuple(sorted({backbone_of(a) for a in ("effnet_linear", "minilm_linear")}))
    public_all = load_public_data("train", backbones)
    rows = np.sort(cap_indices(np.arange(len(public_all)), config.public_size, config.seed))
    public, public_test = public_all.select(rows), load_public_data("test", backbones)
    torch.manual_seed(config.seed)
    g = {m: extract_features(model.encoders[m], public, m, CPU) for m in MODALITIES}
    models = device_models(run_dir)
    uploads = device_uploads(models, public_all, torch.from_numpy(rows))
    before = evaluate_retrieval(model, public_test, CPU)["r1_sum"]
    # What the teacher knows of retrieval, beside what the server knows: R@1 sum of G and of each retrieval
    # device's own features on the public pairs the server trains on, and of the devices on the held-out pairs.
    test_rows = torch.arange(len(public_test))
    result = {"run": str(run_dir), "r1_sum": before, "upload_cos": {
        cid: {m: mean_cosine(f, g[m]) for m, f in ups.items()} for cid, ups in uploads.items()},
        "server_public_r1_sum": r1_sum(g),
        "device_public_r1_sum": {cid: r1_sum(ups) for cid, ups in uploads.items() if len(ups) == 2},
        "device_test_r1_sum": {cid: r1_sum(uplink_features(m, public_test, test_rows, CPU))
                               for cid, m in models.items() if len(m.modalities) == 2},
        "temperatures": {}}
    for temperature in temperatures:
        teachers, entry = {}, {}
        for m in MODALITIES:
            fold = TeacherFold()
            for cid, ups in uploads.items():
                if m in ups:
                    fold.add(cid, ups[m], sed_scores(ups[m].unsqueeze(0), g[m], 512, temperature)[0])
            teachers[m] = fold.teacher()
            entry[m] = {"sed_entropy": fold.weight_entropy(), "teacher_cos": mean_cosine(teachers[m], g[m])}
        entry["teacher_public_r1_sum"] = r1_sum(teachers)  # SED folds each modality on its own
        for spec in targets:
            target, _, lr = spec.partition("@")  # "relations@1e-4": a target at a learning rate of its own
            student = copy.deepcopy(model)
            optimizer = torch.optim.Adam(student.encoders.parameters(), lr=float(lr) if lr else config.distill_lr)
            torch.manual_seed(config.seed)
            distill_epoch(student, optimizer, public, teachers, config.gamma, config.batch_size,
                          seeded_generator(config.seed), CPU, target=target)
            entry[f"delta_{spec}"] = evaluate_retrieval(student, public_test, CPU)["r1_sum"] - before
        result["temperatures"][str(temperature)] = entry
    return result


def main(runs: Annotated[list[Path], typer.Argument(help="simulate run folders of FedAFD federations (a LOCAL one scores its devices' own features, which LOCAL never sends)")],
         temperatures: Annotated[str, typer.Option(help="comma-separated SED temperatures")] = "1,0.3,0.1,0.03,0.01",
         targets: Annotated[str, typer.Option(help="stage-3 targets, each as TARGET or TARGET@DISTILL_LR")] = "features,relations",
         out: Annotated[Path | None, typer.Option(help="write the JSON here too")] = None) -> None:
    temps, chosen = [float(t) for t in temperatures.split(",")], targets.split(",")
    results = [probe(run, temps, chosen) for run in runs]
    for t in temps:
        rows = [r["temperatures"][str(t)] for r in results]
        cells = [f"T={t:<5}"]
        for m in MODALITIES:
            ent = [row[m]["sed_entropy"] for row in rows]
            cos = [row[m]["teacher_cos"] for row in rows]
            cells.append(f"{m}: entropy {statistics.mean(ent):.3f} teacher_cos {statistics.mean(cos):.3f}")
        for target in chosen:
            deltas = [row[f"delta_{target}"] for row in rows]
            spread = statistics.stdev(deltas) if len(deltas) > 1 else 0.0
            cells.append(f"{target} dR@1sum {statistics.mean(deltas):+.2f} ± {spread:.2f}")
        teacher = [row["teacher_public_r1_sum"] for row in rows]
        cells.append(f"teacher R@1 sum on the public pairs {statistics.mean(teacher):.1f}")
        typer.echo(" | ".join(cells))
    server = [r["server_public_r1_sum"] for r in results]
    devices = [v for r in results for v in r["device_public_r1_sum"].values()]
    held_out = [v for r in results for v in r["device_test_r1_sum"].values()]
    typer.echo(f"R@1 sum on the public pairs: server {statistics.mean(server):.1f}, retrieval devices "
               f"{statistics.mean(devices):.1f} (each); on the held-out pairs: server "
               f"{statistics.mean(r['r1_sum'] for r in results):.1f}, retrieval devices {statistics.mean(held_out):.1f}")
    if out is not None:
        out.write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    typer.run(main)
