"""The recipes in examples/ parse against the config schemas: every key known, every value of its type, every data
config readable, and the fleet the paper's (3 CIFAR-100, 3 AG News, 4 Flickr30k devices; a COCO public set)."""

import json
from pathlib import Path

from fedafd.cloud_server.fleet import fleet_configs, parse_fleet
from fedafd.runtime.config import ServerConfig, load_config
from fedafd.runtime.data.sources.options import load_options

PAPER = Path(__file__).resolve().parents[1] / "examples" / "paper"


def test_the_paper_recipe_parses_and_gives_the_papers_fleet() -> None:
    server = load_config(ServerConfig, PAPER / "server.toml")
    fleet = parse_fleet(str(PAPER / "fleet.toml"))
    devices = fleet_configs(server, fleet)
    assert dict(fleet) == {"image": 3, "text": 3, "multimodal": 4}
    assert {c.data for c in devices if c.kind == "image"} == {"/data/cifar-100-binary"}
    # a data config written beside the TOML is found from the TOML's folder, wherever the command runs
    assert {c.data_config for c in devices if c.kind == "text"} == {str(PAPER / "ag_news.toml")}
    assert server.public_data_config == str(PAPER / "coco.toml") and server.public_size == 10_000
    # every device holds the server's public set, split by the server's partitioner
    assert {(c.public_data, c.public_data_config, c.partitioner, c.alpha) for c in devices} == {
        ("/data/coco/dataset_coco.json", str(PAPER / "coco.toml"), "dirichlet", 0.1)}
    assert [(c.partition, c.num_partitions) for c in devices if c.kind == "multimodal"] == [(i, 4) for i in range(4)]
    # the paper's server towers from local folders, which every local device holds too
    assert json.loads(server.image_tower) == {"source": "hf", "path": "/models/resnet-101", "pooling": "pooler"}
    assert json.loads(server.text_tower)["path"] == "/models/bert-base-uncased"
    assert {(c.server_image_tower, c.server_text_tower) for c in devices} == {(server.image_tower, server.text_tower)}


def test_the_paper_recipes_data_configs_parse() -> None:
    ag_news = load_options(PAPER / "ag_news.toml")
    assert ag_news.columns == ("class", "title", "description") and not ag_news.header and ag_news.label_offset == 1
    assert len(ag_news.class_names) == 4
    for name in ("coco.toml", "flickr30k.toml"):
        assert load_options(PAPER / name).format == "karpathy"


IN_DOMAIN = PAPER.parent / "in_domain"


def test_the_in_domain_recipe_parses_and_gives_the_papers_fleet() -> None:
    server = load_config(ServerConfig, IN_DOMAIN / "server.toml")
    fleet = parse_fleet(str(IN_DOMAIN / "fleet.toml"))
    devices = fleet_configs(server, fleet)
    assert dict(fleet) == {"image": 3, "text": 3, "multimodal": 4}
    assert (server.rounds, server.local_epochs, server.max_private, server.max_test) == (10, 5, 100, 500)
    assert server.device_regime == "paper" and server.partitioner == "iid"
    assert server.public_data == "demo:emoji"
    data = IN_DOMAIN / "data"
    assert server.public_subset == str(data / "public_rows.txt") and server.eval_data == str(data / "eval")
    # image and text devices split the bundled sets; the retrieval devices split make_data.py's emoji pool
    assert {c.data for c in devices if c.kind != "multimodal"} == {""}
    assert {(c.data, c.data_config) for c in devices if c.kind == "multimodal"} == {
        (str(data / "pool"), str(data / "pool.toml"))}
    assert {(c.partitioner, c.public_data, c.max_private) for c in devices} == {("iid", "demo:emoji", 100)}
    assert [(c.partition, c.num_partitions) for c in devices if c.kind == "multimodal"] == [(i, 4) for i in range(4)]


def test_the_in_domain_recipes_data_is_what_its_config_reads(tmp_path: Path) -> None:
    """make_data.py writes the files server.toml names; the server accepts them (the subset's ids, no eval picture
    among the public ones), and the retrieval devices' rows are disjoint from the public set and the eval set."""
    import hashlib
    import importlib.util
    import shutil

    import numpy as np

    from fedafd.cloud_server.public_data import server_data
    from fedafd.edge_client.private_data import load_private_data

    spec = importlib.util.spec_from_file_location("make_data", IN_DOMAIN / "make_data.py")
    make_data = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(make_data)
    summary = make_data.make(tmp_path / "data", public_size=100, seed=0)
    assert summary["public_pairs"] == 100 and summary["pool_pairs"] >= 4 * 100 * 3
    shutil.copy(IN_DOMAIN / "server.toml", tmp_path / "server.toml")
    server = load_config(ServerConfig, tmp_path / "server.toml")
    public, test, rows = server_data(server).check(server)
    assert len(rows) == 100 and len(test) == summary["test_pairs"]

    def hashes(images) -> set[str]:
        return {hashlib.sha256(np.ascontiguousarray(p).tobytes()).hexdigest() for p in images}

    public_pictures = hashes(public.inputs["image"][0][rows])
    eval_pictures = hashes(test.inputs["image"][0])
    assert not public_pictures & eval_pictures
    fleet = parse_fleet(str(IN_DOMAIN / "fleet.toml"))
    held = set()
    for config in (c for c in fleet_configs(server, fleet) if c.kind == "multimodal"):
        mine = load_private_data(config)
        pictures = hashes(mine.train.inputs["image"][0])
        assert len(mine.train) == 100 and not pictures & public_pictures and not pictures & eval_pictures
        assert not pictures & held  # the devices' shares are disjoint too
        held |= pictures
    # a second run writes the same files, byte for byte
    again = make_data.make(tmp_path / "again", public_size=100, seed=0)
    assert again == summary
    assert (tmp_path / "again" / "public_rows.txt").read_bytes() == (tmp_path / "data" / "public_rows.txt").read_bytes()
