"""Differentially private devices in a whole (simulated) federation: the epsilon each device reports every round
is Opacus's for the steps it took, it stops training before passing its budget and says so, the record reaches
metrics.jsonl and the tracking scalars, and wrong settings fail before anything starts."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from opacus.accountants import RDPAccountant

from fedafd.cloud_server.fleet import fleet_configs
from fedafd.cloud_server.tracking import flatten_record
from fedafd.runtime.config import ConfigError, ServerConfig, build_config
from fedafd.cloud_server.reporting.html_report import write_html_report
from fedafd.cloud_server.reporting.report import METRICS_FILE
from fedafd.simulation.engine import run_simulation, simulation_config

FLEET = {"image": 1, "text": 1}
PRIVATE, BATCH, EPOCHS, NOISE = 40, 16, 2, 1.2  # 3 Poisson steps an epoch at q = 1/3, 6 a round


def _config(fleet: dict[str, int] = FLEET, **values) -> ServerConfig:
    base = dict(rounds=3, seed=0, public_size=48, feature_dim=16, batch_size=16, max_private=PRIVATE, max_test=32,
                local_epochs=EPOCHS, alpha=1.0, device="cpu", threads=1, device_regime="adapters", baa=False)
    return build_config(ServerConfig, dict(base, **values, **simulation_config(ServerConfig(), fleet)))


def _epsilon(steps: int) -> float:
    accountant = RDPAccountant()
    for _ in range(steps):
        accountant.step(noise_multiplier=NOISE, sample_rate=1 / 3)
    return accountant.get_epsilon(1e-5)


BUDGET = (_epsilon(12) + _epsilon(18)) / 2
"""A budget that two rounds of 6 steps fit and a third does not."""


@pytest.fixture(scope="module")
def dp_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[list[dict], Path]:
    run_dir = tmp_path_factory.mktemp("dp")
    overrides = ["dp=true", f"dp_epsilon={BUDGET}", f"dp_noise={NOISE}", f"batch_size={BATCH}"]
    return run_simulation(_config(), FLEET, run_dir, overrides), run_dir


def test_dp_devices_report_opacus_epsilon_every_round_and_stop_before_the_budget(dp_run) -> None:
    records, tmp_path = dp_run
    budget = BUDGET
    # Assert: metrics.jsonl holds each device's spent epsilon, Opacus's for the steps so far; round 3 trains not.
    lines = [json.loads(line) for line in (tmp_path / METRICS_FILE).read_text().splitlines()]
    assert len(lines) == 3 and len(records) == 3
    for client_id in ("image-0", "text-0"):
        metrics = [line["clients"][client_id]["metrics"] for line in lines]
        assert [m["dp_epsilon"] for m in metrics] == pytest.approx([_epsilon(6), _epsilon(12), _epsilon(12)], rel=1e-9)
        assert [m["dp_training"] for m in metrics] == [1.0, 1.0, 0.0]
        assert all(m["dp_delta"] == 1e-5 and m["dp_epsilon"] <= budget == m["dp_budget"] for m in metrics)
        assert lines[2]["clients"][client_id]["losses"] == {}  # nothing trained in round 3
        assert flatten_record(lines[1])[f"device/{client_id}/dp_epsilon"] == pytest.approx(_epsilon(12))
    # The device's accountant history survives in its state (a restarted device goes on counting).
    state = json.loads((tmp_path / "clients" / "image-0" / "client_state.json").read_text())
    assert state["dp_history"] == [[NOISE, pytest.approx(1 / 3), 12]]


def test_the_html_report_shows_each_dp_devices_epsilon_and_a_run_without_dp_has_no_such_section(dp_run, tmp_path) -> None:
    records, run_dir = dp_run
    page = write_html_report(run_dir).read_text()
    section = page[page.index('<section id="privacy">'):]
    section = section[:section.index("</section>")]
    assert 'id="plot-privacy"' in section
    assert f"<td>{records[-1]['clients']['image-0']['metrics']['dp_epsilon']:.3g}</td>" in section
    assert "no (budget spent)" in section
    assert section.count("<tr>") == 3  # the header and the two DP devices
    plain = tmp_path / "plain"
    run_simulation(_config({"image": 1}, rounds=1), {"image": 1}, plain)  # a config expecting 2 devices waits join_timeout_s
    assert '<section id="privacy">' not in write_html_report(plain).read_text()


@pytest.mark.parametrize("overrides, config, message", [
    (["dp=true", "dp_epsilon=0"], {}, "dp_epsilon must be > 0"),
    (["dp=true", "dp_delta=1"], {}, "dp_delta must be in"),
    (["dp=true"], {"device_regime": "mixed"}, "image-1: dp: image_arch=cnn_small cannot be trained with DP-SGD"),
    (["dp=true"], {"baa": True, "baa_schedule": "paired"}, "baa_schedule=pass"),
])
def test_wrong_dp_settings_fail_before_anything_starts_naming_the_key(overrides, config, message) -> None:
    with pytest.raises(ConfigError, match=message):
        fleet_configs(_config(**config), {"image": 2, "text": 1}, overrides)  # image-1 is the mixed regime's CNN


def test_retrieval_devices_are_refused_dp_with_the_reason() -> None:
    with pytest.raises(ConfigError, match="multimodal-0: dp: retrieval devices cannot train with DP-SGD"):
        fleet_configs(_config(), {"multimodal": 1}, ["dp=true"])
