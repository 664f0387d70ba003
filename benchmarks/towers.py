"""The feature cache through a tower of the user's own against a plain loop over the same model and inputs.

    python -m fedafd.benchmarks.towers --rows 2000 --out runs/bench/towers.json

Makes two towers with `save_pretrained` in a temporary folder (random weights: the cost is the architecture's):
a BERT of 4 layers, 256 wide (text), and a ResNet of 4 stages [32, 64, 128, 256] at 96 px (image); takes --rows
bundled texts (WordNet glosses) and pictures (Tux Paint stamps at their source resolution) and measures, in this
one process, side by side, best of --repeats:

  (a) fedafd: `compute_features` into a fresh feature cache (its ONNX export excluded: done once per tower and
      kept), i.e. the tower's own preprocessing (tokenizer / fit_picture), ONNX Runtime, the streamed .npy write
      and the sidecar's hashes;
  (b) a plain loop: the same preprocessing and the same batches through the PyTorch module in eval mode under
      torch.inference_mode, features into a preallocated array.

Target: (a) at least 0.9x (b)'s rows per second. Prints a table and writes the JSON to --out.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from fedafd.benchmarks.latency import cpu_model


def _towers(folder: Path) -> dict[str, str]:
    from transformers import AutoTokenizer, BertConfig, BertModel, ResNetConfig, ResNetModel

    from fedafd.runtime.data.text import tokenizer_path

    torch.manual_seed(0)
    BertModel(BertConfig(hidden_size=256, num_hidden_layers=4, num_attention_heads=4, intermediate_size=1024,
                         max_position_embeddings=128)).save_pretrained(folder / "bert")
    AutoTokenizer.from_pretrained(str(tokenizer_path()), local_files_only=True).save_pretrained(folder / "bert")
    ResNetModel(ResNetConfig(embedding_size=32, hidden_sizes=[32, 64, 128, 256], depths=[1, 1, 1, 1])
                ).save_pretrained(folder / "resnet")
    (folder / "resnet" / "preprocessor_config.json").write_text(json.dumps({
        "size": {"shortest_edge": 96}, "crop_pct": 1.0, "image_mean": [0.485, 0.456, 0.406],
        "image_std": [0.229, 0.224, 0.225]}))
    return {"text": f"hf:{folder / 'bert'}", "image": f"hf:{folder / 'resnet'}"}


def _data(modality: str, rows: int):
    from fedafd.runtime.data.modal import load_public_data, load_task_data

    data = load_task_data("text", "train") if modality == "text" else load_public_data("train")
    return data.select(np.arange(min(rows, len(data))))


def _plain_loop(name: str, data) -> float:
    """Seconds for the plain PyTorch loop: the same inputs, batches and module, no cache."""
    from fedafd.runtime.backbones import backbone_spec, build_backbone
    from fedafd.runtime.data.features import BATCH_ROWS, tower_batch

    spec = backbone_spec(name)
    module = build_backbone(name).eval()
    out = np.empty((len(data), spec.dim), dtype=np.float32)
    step = BATCH_ROWS[spec.modality]
    start = time.perf_counter()
    with torch.inference_mode():
        for first in range(0, len(data), step):
            batch = tower_batch(name, data, slice(first, first + step))
            out[first:first + len(batch[0])] = module(*batch).numpy()
    return time.perf_counter() - start


def _cached(name: str, data, cache: Path, repeat: int) -> float:
    """Seconds for fedafd's feature cache to compute the features from scratch (the ONNX export kept)."""
    from fedafd.runtime.data import features

    for path in cache.glob(f"{name}-*"):
        path.unlink()
    start = time.perf_counter()
    features.compute_features(name, f"bench-{repeat}", data, 0, progress=False)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=2000, help="rows of each modality")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=0, help="torch and ORT threads (0: their defaults)")
    parser.add_argument("--out", type=Path, default=Path("runs/bench/towers.json"), help="JSON file for the results")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    from fedafd.runtime.backbones import register_tower
    from fedafd.runtime.data import features
    from fedafd.runtime.towers import parse_tower

    results = {"machine": cpu_model(), "rows": args.rows, "repeats": args.repeats, "towers": {}}
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        cache = folder / "features"
        features.features_dir = lambda: cache  # a fresh cache, the bundled one untouched
        for modality, setting in _towers(folder).items():
            name = register_tower(parse_tower(setting, f"{modality}_tower"))
            data = _data(modality, args.rows)
            features.backbone_session(name, 0, features.tower_batch(name, data, slice(0, 8)))  # the export, once
            plain = min(_plain_loop(name, data) for _ in range(args.repeats))
            cached = min(_cached(name, data, cache, r) for r in range(args.repeats))
            ratio = plain / cached
            results["towers"][modality] = {"tower": setting.split("/")[-1], "rows": len(data),
                                           "fedafd_rows_per_s": len(data) / cached,
                                           "plain_rows_per_s": len(data) / plain, "ratio": ratio,
                                           "target": 0.9, "met": ratio >= 0.9}
            print(f"{modality:5s} {len(data)} rows: fedafd {len(data) / cached:7.0f} rows/s, plain PyTorch loop "
                  f"{len(data) / plain:7.0f} rows/s, ratio {ratio:.2f} (target >= 0.9{'' if ratio >= 0.9 else ': MISSED'})")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
