from pathlib import Path

import pytest

from fedafd.cloud_server.fleet import DEVICE_REGIMES, LocalFleet, client_ids, fleet_configs, parse_fleet
from fedafd.runtime.config import DEVICE_REGIMES as CONFIG_REGIMES
from fedafd.runtime.config import ConfigError, ServerConfig, load_config


def test_parse_fleet_spec() -> None:
    fleet = parse_fleet("image=3,text=3,multimodal=4")
    assert fleet == {"image": 3, "text": 3, "multimodal": 4}
    assert client_ids(fleet)[:4] == ["image-0", "image-1", "image-2", "text-0"]
    assert len(client_ids(fleet)) == 10


@pytest.mark.parametrize("spec", ["image", "audio=2", "image=-1", "image=2,image=1", "image=0"])
def test_bad_fleet_spec(spec: str) -> None:
    with pytest.raises(ConfigError, match="--local"):
        parse_fleet(spec)


def test_client_commands_vary_architectures_and_pass_the_split(tmp_path: Path) -> None:
    fleet = LocalFleet({"image": 2}, "tcp://127.0.0.1:5000", tmp_path, ServerConfig(alpha=0.3, max_private=50))
    first, second = fleet.command("image", 0), fleet.command("image", 1)
    assert "image_arch=effnet_linear" in first and "image_arch=cnn_small" in second
    assert "alpha=0.3" in first and "max_private=50" in first
    assert first[first.index("--num-partitions") + 1] == "2"
    assert second[second.index("--partition") + 1] == "1"


def test_device_settings_reach_every_device_after_the_fleets_own(tmp_path: Path) -> None:
    fleet = LocalFleet({"text": 1}, "tcp://127.0.0.1:5000", tmp_path, ServerConfig(), client_overrides=["disc_lr=1e-4"])
    command = fleet.command("text", 0)
    settings = [command[i + 1] for i, part in enumerate(command) if part == "-c"]
    assert settings[-1] == "disc_lr=1e-4" and "text_arch=minilm_linear" in settings


def test_a_bad_device_setting_is_refused_before_anything_starts(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from fedafd.cloud_server.cli import app

    result = CliRunner().invoke(app, ["serve", "--local", "image=1", "--out", str(tmp_path / "run"),
                                      "--local-set", "disc_lr=fast"])
    assert result.exit_code == 2
    assert "disc_lr must be a number" in result.output


@pytest.mark.parametrize("regime, image, text", [
    ("mixed", ["effnet_linear", "cnn_small", "effnet_mlp", "effnet_linear"], ["minilm_linear", "gru", "minilm_mlp", "minilm_linear"]),
    ("paper", ["cnn_small"] * 4, ["gru"] * 4),
    ("adapters", ["effnet_linear", "effnet_mlp"] * 2, ["minilm_linear", "minilm_mlp"] * 2),
])
def test_each_device_regime_gives_its_architectures_in_turn(regime: str, image: list[str], text: list[str]) -> None:
    configs = fleet_configs(ServerConfig(device_regime=regime), {"image": 4, "multimodal": 4})
    assert [c.image_arch for c in configs if c.kind == "image"] == image
    assert [(c.image_arch, c.text_arch) for c in configs if c.kind == "multimodal"] == list(zip(image, text))


def test_the_config_knows_every_regime_the_fleet_defines() -> None:
    assert set(CONFIG_REGIMES) == set(DEVICE_REGIMES)
    with pytest.raises(ConfigError, match="device_regime"):
        load_config(ServerConfig, None, ["device_regime=tiny"])


def test_pools_and_the_public_set_of_the_server_reach_its_devices() -> None:
    # Prepare: a server whose image devices split a pool with Flower's shard partitioner, and its own public set.
    config = ServerConfig(image_data="/data/cifar-100-binary", image_data_config="cifar.toml", partitioner="shard",
                          shard_size=50, public_data="/data/coco/captions_train2017.json")
    # Execute
    configs = fleet_configs(config, {"image": 2, "text": 1})
    # Assert: each image device is one share of the pool; the text device reads its bundled set; all hold P.
    image = [c for c in configs if c.kind == "image"]
    assert [(c.data, c.partition, c.num_partitions) for c in image] == [("/data/cifar-100-binary", 0, 2),
                                                                       ("/data/cifar-100-binary", 1, 2)]
    assert image[0].data_config == "cifar.toml" and image[0].partitioner == "shard" and image[0].shard_size == 50
    (text,) = [c for c in configs if c.kind == "text"]
    assert text.data == "" and text.partitioner == "shard"
    assert {c.public_data for c in configs} == {"/data/coco/captions_train2017.json"}


def test_a_fleet_toml_gives_kinds_their_pools_and_devices_their_own_folders(tmp_path: Path) -> None:
    # Prepare: two image devices of a pool; two text devices, each with its own folder from `data split`.
    toml = tmp_path / "fleet.toml"
    toml.write_text('[image]\ncount = 2\ndata = "pool/cifar"\npartitioner = "dirichlet"\nalpha = 0.5\n\n'
                    '[text]\ntest_fraction = 0.1\n[[text.device]]\ndata = "split/text-0"\n'
                    '[[text.device]]\ndata = "/abs/text-1"\nlr = 0.01\n')
    # Execute
    fleet = parse_fleet(str(toml))
    configs = fleet_configs(ServerConfig(), fleet)
    # Assert: counts in order; relative paths read from the TOML's folder; a device's own data is all its rows.
    assert dict(fleet) == {"image": 2, "text": 2} and client_ids(fleet)[2] == "text-0"
    image0, image1, text0, text1 = configs
    assert image0.data == str(tmp_path / "pool/cifar") and (image1.partition, image1.num_partitions) == (1, 2)
    assert image0.partitioner == "dirichlet" and image0.alpha == 0.5
    assert (text0.data, text0.num_partitions, text0.test_fraction) == (str(tmp_path / "split/text-0"), 1, 0.1)
    assert (text1.data, text1.lr, text1.partition) == ("/abs/text-1", 0.01, 0)
    command = LocalFleet(fleet, "tcp://127.0.0.1:5000", tmp_path, ServerConfig()).command("text", 1)
    assert "data=/abs/text-1" in command and "num_partitions=1" in command


@pytest.mark.parametrize("body, match", [
    ('[audio]\ncount = 1\n', "not a device kind"),
    ('[image]\ncount = "two"\n', "image.count"),
    ('[image]\ncount = 1\nlr = "fast"\n', "device image-0: lr must be a number"),
    ('[image]\ncount = 1\npartitioner = "kmeans"\n', "partitioner must be one of"),
])
def test_a_bad_fleet_toml_names_the_key(tmp_path: Path, body: str, match: str) -> None:
    toml = tmp_path / "fleet.toml"
    toml.write_text(body)
    with pytest.raises(ConfigError, match=match):
        parse_fleet(str(toml))
