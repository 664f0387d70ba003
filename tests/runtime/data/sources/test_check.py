"""`data check`: the report of a small ImageFolder with bad files (rows, classes and counts, picture sizes, every
problem listed and counted), of pairs (captions per picture), and the two commands: exit 1 on any problem, JSON
that parses, the server's check of the bundled demo passing with its flags warning."""

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from fedafd.cloud_server.cli import app as cloud_app
from fedafd.cloud_server.data_check import check_server
from fedafd.edge_client.cli import app as edge_app
from fedafd.runtime.config import ServerConfig
from fedafd.runtime.data.sources import imagefolder
from fedafd.runtime.data.sources.check import check_source
from fedafd.runtime.data.sources.records import MAX_LISTED_PROBLEMS
from fedafd.runtime.data.sources.registry import open_source, sources_dir

runner = CliRunner()
SIZES = {"cat": [(40, 30), (40, 30), (64, 48), (40, 30), (40, 30)], "dog": [(20, 20), (20, 20), (20, 20)]}
"""(width, height) of each class's good pictures."""


def folder_with_bad_files(root: Path, bad: int = 2) -> Path:
    """cat/ with five pictures, dog/ with three, and `bad` broken files in cat/ (one of them empty)."""
    for label, sizes in SIZES.items():
        for i, (width, height) in enumerate(sizes):
            (root / label).mkdir(parents=True, exist_ok=True)
            pixels = np.full((height, width, 3), 30 * i + (label == "dog") * 100, np.uint8)
            Image.fromarray(pixels).save(root / label / f"{i}.png")
    for i in range(bad):
        (root / "cat" / f"bad{i:02d}.png").write_bytes(b"" if i == 0 else b"\x89PNG not really")
    return root


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("FEDAFD_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def test_report_of_an_image_folder_with_bad_files(tmp_path, cache):
    root = folder_with_bad_files(tmp_path / "data")
    report = check_source("image", str(root))
    assert report["format"] == "imagefolder" and report["problem_count"] == 2
    assert report["digest"] == open_source("image", root, on_bad_sample="skip", cache=False).digest
    assert report["splits"] == {"all": {"rows": 8, "classes": 2, "counts": {"cat": 5, "dog": 3}}}
    assert report["train"]["rows"] + report["test"]["rows"] == 8 and report["test"]["rows"] == 2  # test_fraction 0.2
    assert report["images"] == {"pictures": 8, "width": {"min": 20, "median": 40.0, "max": 64},
                                "height": {"min": 20, "median": 30.0, "max": 48}}
    assert report["problems"][0] == f"{root / 'cat' / 'bad00.png'}: zero-byte file"
    assert report["problems"][1].startswith(f"{root / 'cat' / 'bad01.png'}: unreadable or truncated image")
    json.dumps(report)  # JSON-able as it is
    assert [p for p in sources_dir().iterdir()] == []  # its temporary build is gone: nothing cached with problems


def test_every_problem_is_counted_and_the_first_are_listed(tmp_path, cache):
    report = check_source("image", str(folder_with_bad_files(tmp_path / "data", bad=25)))
    assert report["problem_count"] == 25 and len(report["problems"]) == MAX_LISTED_PROBLEMS
    assert report["splits"]["all"]["rows"] == 8


def test_a_clean_check_leaves_the_cached_source_a_device_reads(tmp_path, cache, monkeypatch):
    root = folder_with_bad_files(tmp_path / "data", bad=0)
    report = check_source("image", str(root))
    assert report["problem_count"] == 0 and report["problems"] == []
    monkeypatch.setattr(imagefolder, "read", lambda *args: pytest.fail("read again instead of from the cache"))
    assert open_source("image", root).digest == report["digest"]


def test_a_path_that_is_no_source_is_one_problem(tmp_path, cache):
    report = check_source("image", str(tmp_path / "missing"))
    assert report["problem_count"] == 1 and "no such file or folder" in report["problems"][0]
    assert report["format"] is None and report["splits"] == {} and "train" not in report


def test_report_of_pairs_counts_captions_per_picture(tmp_path, cache):
    root = tmp_path / "pairs"
    root.mkdir()
    lines = []
    for i in range(6):
        Image.fromarray(np.full((24, 36, 3), 40 * i, np.uint8)).save(root / f"{i}.png")
        lines += [{"file_name": f"{i}.png", "text": f"picture {i} caption {c}"} for c in range(1 + i % 3)]
    (root / "metadata.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    report = check_source("multimodal", str(root), test_fraction=0.5)
    split = report["splits"]["all"]
    assert split["rows"] == len(lines) == 12 and split["pictures"] == 6
    assert split["captions_per_picture"] == {"min": 1, "mean": 2.0, "max": 3}
    assert report["train"]["pictures"] + report["test"]["pictures"] == 6
    assert report["images"]["width"] == {"min": 36, "median": 36.0, "max": 36} and report["problem_count"] == 0


def test_test_data_is_checked_too(tmp_path, cache):
    train = folder_with_bad_files(tmp_path / "train", bad=0)
    test = folder_with_bad_files(tmp_path / "test", bad=1)
    report = check_source("image", str(train), test_location=str(test))
    assert report["test_source"]["splits"]["all"]["rows"] == 8
    assert report["train"]["rows"] == 8 and report["test"]["rows"] == 8
    assert report["problem_count"] == 1 and str(test) in report["problems"][0]


# --- the commands --------------------------------------------------------------------------------


def test_edge_data_check_exits_1_on_a_problem_and_prints_json(tmp_path, cache):
    root = folder_with_bad_files(tmp_path / "data")
    result = runner.invoke(edge_app, ["data", "check", "--kind", "image", "--data", str(root), "--format", "json"])
    assert result.exit_code == 1, result.output
    report = json.loads(result.stdout)
    assert report["problem_count"] == 2 and report["splits"]["all"]["counts"] == {"cat": 5, "dog": 3}
    text = runner.invoke(edge_app, ["data", "check", "--kind", "image", "--data", str(root)])
    assert text.exit_code == 1
    assert "split all: 8 rows, 2 classes: cat 5, dog 3" in text.stdout and "2 problems:" in text.stdout
    assert "bad01.png: unreadable" in text.stdout


def test_edge_data_check_of_clean_data_exits_0(tmp_path, cache):
    root = folder_with_bad_files(tmp_path / "data", bad=0)
    result = runner.invoke(edge_app, ["data", "check", "--kind", "image", "--data", str(root), "--test-fraction",
                                      "0.25"])
    assert result.exit_code == 0, result.output
    assert "train: 6 rows" in result.stdout and "test: 2 rows" in result.stdout and "no problems" in result.stdout
    assert "pictures: 8, width 20-64 (median 40), height 20-48 (median 30)" in result.stdout


def test_edge_data_check_usage_errors_exit_2(tmp_path):
    assert runner.invoke(edge_app, ["data", "check", "--kind", "image"]).exit_code == 2  # no --data
    assert runner.invoke(edge_app, ["data", "check", "--kind", "sound", "--data", str(tmp_path)]).exit_code == 2


def test_server_check_of_the_demo_passes_with_the_flags_warning():
    report = check_server(ServerConfig())
    assert report["problem_count"] == 0 and report["problems"] == []
    assert report["shared_pictures"] == 2 and "flags of France" in report["warnings"][0]
    assert report["pool"]["rows"] == 1496 and report["eval_rows"]["rows"] == 374
    result = runner.invoke(cloud_app, ["data", "check", "--format", "json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["public"]["format"] == "demo"


def test_server_check_names_bad_subset_ids_and_a_bad_pool(tmp_path, cache):
    subset = tmp_path / "subset.txt"
    subset.write_text("0\n5\n99999\n")
    pool = folder_with_bad_files(tmp_path / "pool")
    result = runner.invoke(cloud_app, ["data", "check", "-c", f"public_subset={subset}", "-c", f"image_data={pool}"])
    assert result.exit_code == 1, result.output
    assert "row id 99999 is outside the public set's 1496 rows" in result.stdout
    assert "image pool:" in result.stdout and "3 problems:" in result.stdout
    report = check_server(ServerConfig(public_subset=str(subset), image_data=str(pool)))
    assert report["problem_count"] == 3 and report["pools"]["image"]["splits"]["all"]["rows"] == 8
