import dataclasses
from pathlib import Path

import pytest

from fedafd.runtime.config import ClientConfig, ConfigError, ServerConfig, build_config, help_for, load_config


def test_defaults_then_file_then_overrides(tmp_path: Path) -> None:
    # Prepare
    toml = tmp_path / "server.toml"
    toml.write_text('rounds = 7\nstrategy = "local"\nbeta = 0.25\n')
    # Execute
    config = load_config(ServerConfig, toml, ["rounds=9", "baa=false", "device=cpu"])
    # Assert: the override beats the file, the file beats the default, untouched keys keep defaults
    assert config.rounds == 9
    assert config.strategy == "local"
    assert config.beta == 0.25
    assert config.baa is False and config.gff is True
    assert config.device == "cpu"
    assert config.gamma == 0.4


@pytest.mark.parametrize("override, fragment", [
    ("round=3", "unknown config key 'round'"),
    ("rounds=three", "rounds must be an integer"),
    ("rounds=0", "rounds must be > 0"),
    ("baa=maybe", "baa must be true or false"),
    ("device=tpu", "device must be one of"),
    ("quorum=1.5", "quorum must be in (0, 1]"),
    ("feature_dim=30", "feature_dim must be divisible by 4"),
    ("image_arch=vgg", "image_arch must be one of"),
    ("rounds", "key=value"),
])
def test_bad_values_name_the_key(override: str, fragment: str) -> None:
    with pytest.raises(ConfigError, match=None) as caught:
        load_config(ServerConfig, None, [override])
    assert fragment in str(caught.value)


def test_client_config_derives_its_id_and_checks_partition() -> None:
    config = build_config(ClientConfig, {"kind": "text", "partition": 2, "num_partitions": 3})
    assert config.client_id == "text-2"
    with pytest.raises(ConfigError, match="partition must be < num_partitions"):
        build_config(ClientConfig, {"kind": "text", "partition": 3, "num_partitions": 3})
    with pytest.raises(ConfigError, match="kind must be one of"):
        build_config(ClientConfig, {"kind": "audio"})
    with pytest.raises(ConfigError, match="client_id"):
        build_config(ClientConfig, {"client_id": "a b/c"})


def test_missing_or_broken_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not found"):
        load_config(ServerConfig, tmp_path / "nope.toml")
    broken = tmp_path / "broken.toml"
    broken.write_text("rounds = = 3")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(ServerConfig, broken)


def test_every_field_has_a_docstring() -> None:
    for cls in (ServerConfig, ClientConfig):
        docs = help_for(cls)
        missing = [f.name for f in dataclasses.fields(cls) if f.name not in docs]  # keys, not ClassVars
        assert not missing, f"{cls.__name__} fields without a docstring: {missing}"
