"""Writes flower_partitions.json: Flower Datasets' own partitions of a fixed label array, the goldens that
test_partitioners.py holds `partition_rows` to. Not run by the tests (fedafd cannot depend on flwr-datasets: it
pins datasets<5).

How it was run (flwr-datasets 0.6.1, datasets 4.8.5, numpy 2.4.6, Python 3.11), in a venv of its own, never the
repository's:

    python3 -m venv /tmp/flwrvenv && /tmp/flwrvenv/bin/pip install -q flwr-datasets==0.6.1
    /tmp/flwrvenv/bin/python tests/runtime/data/make_flower_partitions.py

Each setting builds a Flower partitioner, gives it a `datasets.Dataset` of the labels, the natural ids and a `row`
column (each row's index), loads every partition and keeps the sorted `row` values: the index sets, whatever
order Flower returns them in (or, where Flower refuses the setting, its error). The "iid" settings with
shuffle=True reproduce what `FederatedDataset` does by default (`dataset.shuffle(seed=seed)` before the
partitioner sees it).
"""

from __future__ import annotations

import json
import sys
from importlib.metadata import version
from pathlib import Path

import numpy as np

OUT = Path(__file__).with_name("flower_partitions.json")
NUM_ROWS = 400
NUM_CLASSES = 10
NUM_WRITERS = 9


def make_rows() -> tuple[list[int], list[str]]:
    """Skewed labels (some classes rare) and a natural id per row, from a fixed generator."""
    rng = np.random.default_rng(20250101)
    weights = rng.dirichlet(np.full(NUM_CLASSES, 2.0))
    labels = rng.choice(NUM_CLASSES, size=NUM_ROWS, p=weights)
    writers = rng.choice(NUM_WRITERS, size=NUM_ROWS)
    return [int(x) for x in labels], [f"writer-{int(w):02d}" for w in writers]


# (partitioner name, num_partitions, seed, parameters as fedafd's PartitionerSpec fields)
SETTINGS: list[tuple[str, int, int, dict]] = [
    ("iid", 5, 42, {"shuffle": False}),
    ("iid", 7, 42, {"shuffle": True}),
    ("iid", 6, 3, {"shuffle": True}),
    ("dirichlet", 5, 42, {"alpha": 0.5, "min_partition_size": 10}),
    ("dirichlet", 4, 7, {"alpha": 0.1, "min_partition_size": 5}),
    ("dirichlet", 8, 42, {"alpha": 0.3, "min_partition_size": 0}),
    ("dirichlet", 8, 42, {"alpha": 0.1, "min_partition_size": 10}),  # 3 draws fail min_partition_size first
    ("dirichlet", 10, 42, {"alpha": 0.3, "min_partition_size": 20}),  # 2 fail first
    ("dirichlet", 10, 42, {"alpha": 0.1, "min_partition_size": 30}),  # all 11 fail: Flower raises
    ("dirichlet", 6, 42, {"alpha": 1.0, "min_partition_size": 10, "self_balancing": True}),
    ("dirichlet", 5, 11, {"alpha": 0.2, "min_partition_size": 0, "self_balancing": True}),
    ("shard", 5, 42, {"num_shards_per_partition": 2}),
    ("shard", 4, 42, {"num_shards_per_partition": 3, "keep_incomplete_shard": True}),
    ("shard", 6, 5, {"shard_size": 25}),
    ("shard", 7, 42, {"shard_size": 30, "keep_incomplete_shard": True}),
    ("shard", 5, 42, {"num_shards_per_partition": 2, "shard_size": 20}),
    ("pathological", 6, 42, {"num_classes_per_partition": 2, "class_assignment_mode": "first-deterministic"}),
    ("pathological", 14, 9, {"num_classes_per_partition": 3, "class_assignment_mode": "first-deterministic"}),
    ("pathological", 5, 1, {"num_classes_per_partition": 3, "class_assignment_mode": "random"}),
    ("pathological", 4, 42, {"num_classes_per_partition": 2, "class_assignment_mode": "deterministic"}),
    ("natural", NUM_WRITERS, 42, {}),
]


def flower_partitioner(name: str, num_partitions: int, seed: int, params: dict):
    from flwr_datasets import partitioner as fp

    if name == "iid":
        return fp.IidPartitioner(num_partitions=num_partitions)
    if name == "dirichlet":
        return fp.DirichletPartitioner(num_partitions=num_partitions, partition_by="label", alpha=params["alpha"],
                                       min_partition_size=params["min_partition_size"],
                                       self_balancing=params.get("self_balancing", False), seed=seed)
    if name == "shard":
        return fp.ShardPartitioner(num_partitions=num_partitions, partition_by="label",
                                   num_shards_per_partition=params.get("num_shards_per_partition"),
                                   shard_size=params.get("shard_size"),
                                   keep_incomplete_shard=params.get("keep_incomplete_shard", False), seed=seed)
    if name == "pathological":
        return fp.PathologicalPartitioner(num_partitions=num_partitions, partition_by="label",
                                          num_classes_per_partition=params["num_classes_per_partition"],
                                          class_assignment_mode=params["class_assignment_mode"], seed=seed)
    if name == "natural":
        return fp.NaturalIdPartitioner(partition_by="writer")
    raise ValueError(name)


def main() -> None:
    import datasets

    labels, writers = make_rows()
    cases = []
    for name, num_partitions, seed, params in SETTINGS:
        dataset = datasets.Dataset.from_dict({"label": labels, "writer": writers, "row": list(range(NUM_ROWS))})
        if name == "iid" and params["shuffle"]:
            dataset = dataset.shuffle(seed=seed)  # what FederatedDataset(shuffle=True, seed=seed) does first
        partitioner = flower_partitioner(name, num_partitions, seed, params)
        partitioner.dataset = dataset
        case = {"name": name, "num_partitions": num_partitions, "seed": seed, "params": params}
        try:
            case["partitions"] = [sorted(partitioner.load_partition(i)["row"])
                                  for i in range(partitioner.num_partitions)]
            outcome = f"sizes {[len(p) for p in case['partitions']]}"
        except ValueError as err:  # kept as a case too: ours must refuse the same setting
            case["error"] = outcome = str(err)
        cases.append(case)
        print(f"{name:13} P={num_partitions:2} seed={seed:2} {params}: {outcome}", file=sys.stderr)
    golden = {"flwr_datasets": version("flwr-datasets"), "datasets": version("datasets"), "numpy": np.__version__,
              "labels": labels, "natural_ids": writers, "cases": cases}
    OUT.write_text(json.dumps(golden, separators=(",", ":")) + "\n")
    print(f"wrote {OUT} ({OUT.stat().st_size} bytes)", file=sys.stderr)


if __name__ == "__main__":
    main()
