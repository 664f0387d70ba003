"""Write the in-domain recipe's data from the bundled emoji pairs (`demo:emoji`), once:

    .venv/bin/python examples/in_domain/make_data.py                  # into examples/in_domain/data (git-ignored)
    .venv/bin/python examples/in_domain/make_data.py --out DIR --public-size 100 --seed 0

OUT/public_rows.txt  the public subset P: ids of demo:emoji's train rows (server.toml's public_subset)
OUT/pool/train/      every other emoji train pair, a metadata.jsonl folder: the retrieval devices' pool, disjoint
                     from P (multimodal_data; partitioned among the devices by the server's partitioner)
OUT/pool/test/       the held-out emoji test pairs: the retrieval devices' test rows
OUT/eval/            the same held-out pairs: the server's retrieval test (eval_data)
OUT/pool.toml        the pool's data config (pairs grouped by emoji group, for the partitioners)
OUT/summary.json     row counts, the ratio (pool pairs / public pairs) and the source's digest

An emoji train row whose pixels are also a test picture's (the bundled split has two such flags) is in neither P
nor the pool, and the eval set holds only test pictures no train row has: the server is never tested on a picture
it or a device trains on. The same arguments give the same files, byte for byte.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
SOURCE = "demo:emoji"


def _png(pixels: np.ndarray) -> bytes:
    """A (3, H, W) uint8 array as PNG bytes (the 32 px picture every fedafd tower reads back unchanged)."""
    from PIL import Image

    from fedafd.runtime.data.pictures import png_bytes

    return png_bytes(Image.fromarray(np.ascontiguousarray(pixels.transpose(1, 2, 0))))


def _hash(pixels: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(pixels).tobytes()).hexdigest()


def _write_pairs(folder: Path, data, rows: np.ndarray) -> None:
    """A metadata.jsonl folder of `rows` of `data` (a picture per row, its caption and its emoji group). Each
    picture is written at its source resolution (a tower of its own reads it at full size; its 32 px array is
    the bundled one again), or as its 32 px array where the data keeps no original."""
    folder.mkdir(parents=True)
    with open(folder / "metadata.jsonl", "w") as metadata:
        for row in rows.tolist():
            name = f"{row:05d}.png"
            encoded = data.pictures.encoded(row) if data.pictures is not None else _png(data.images[row])
            (folder / name).write_bytes(encoded)
            metadata.write(json.dumps({"file_name": name, "text": data.captions[row],
                                       "group": data.group_names[int(data.groups[row])]}) + "\n")


def make(out: Path, public_size: int = 100, seed: int = 0) -> dict:
    from fedafd.runtime.data.sources.registry import open_source

    source = open_source("public", SOURCE)
    train, test = source.splits["train"], source.splits["test"]
    test_hashes = {_hash(p) for p in test.images}
    train_hashes = [_hash(p) for p in train.images]
    usable = np.array([i for i, h in enumerate(train_hashes) if h not in test_hashes], dtype=np.int64)
    if not 0 < public_size < len(usable):
        raise SystemExit(f"--public-size must be in (0, {len(usable)}), got {public_size}")
    public = np.sort(np.random.default_rng(seed).choice(usable, size=public_size, replace=False))
    public_hashes = {train_hashes[i] for i in public.tolist()}
    # the pool: disjoint rows, and no picture that is also a public one (a duplicate drawing under two names)
    pool = np.array([i for i in usable.tolist() if i not in set(public.tolist()) and train_hashes[i] not in public_hashes],
                    dtype=np.int64)
    held = np.array([i for i, p in enumerate(test.images) if _hash(p) not in set(train_hashes)], dtype=np.int64)

    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    (out / "public_rows.txt").write_text(
        f"# {public_size} row ids of {SOURCE}'s train split (make_data.py --seed {seed}): the public set P\n"
        + "".join(f"{i}\n" for i in public.tolist()))
    _write_pairs(out / "pool" / "train", train, pool)
    _write_pairs(out / "pool" / "test", test, held)
    _write_pairs(out / "eval", test, held)
    group_names = ", ".join(json.dumps(g) for g in train.group_names)
    (out / "pool.toml").write_text(
        "# The emoji pairs written by make_data.py (metadata.jsonl folders): grouped by emoji group for the\n"
        "# partitioners, in demo:emoji's group order.\n"
        f'group_column = "group"\ngroup_names = [{group_names}]\n')
    summary = {"source": SOURCE, "source_digest": source.digest, "seed": seed, "public_pairs": int(len(public)),
               "pool_pairs": int(len(pool)), "test_pairs": int(len(held)),
               "left_out_train_rows": int(len(train) - len(public) - len(pool)),
               "left_out_test_rows": int(len(test) - len(held)),
               "pool_over_public": round(len(pool) / len(public), 2)}
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=HERE / "data", help="where the files go (replaced if present)")
    parser.add_argument("--public-size", type=int, default=100, help="pairs in the public subset P")
    parser.add_argument("--seed", type=int, default=0, help="seed of the public subset's draw")
    args = parser.parse_args()
    print(json.dumps(make(args.out, args.public_size, args.seed), indent=2))


if __name__ == "__main__":
    main()
