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
