"""The simulation engine: turns in a fixed order, each participant's own random numbers, the same run twice,
and devices that hold their state on disk between turns."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import pytest
import torch

from fedafd.runtime.config import ServerConfig, build_config
from fedafd.cloud_server.reporting.report import METRICS_FILE, without_timings
from fedafd.runtime.torch_utils import OwnRandom
from fedafd.runtime.turns import JOINING, SERVER
from fedafd.simulation.engine import SequentialTurns, device_configs, run_simulation, simulation_config

FLEET = {"image": 2, "text": 1, "multimodal": 1}


def test_devices_take_their_turns_in_the_fleet_order_whatever_order_they_ask_in() -> None:
    # Prepare: four devices that ask for their round-0 turn in reverse order, one at a time.
    order = ["a", "b", "c", "d"]
    turns = SequentialTurns(order)
    taken: list[str] = []
    inside = [0]

    def device(who: str) -> None:
        with turns.take(who, 0):
            inside[0] += 1
            assert inside[0] == 1, "two participants computed at once"
            taken.append(who)
            time.sleep(0.01)
            inside[0] -= 1

    threads = [threading.Thread(target=device, args=(who,)) for who in reversed(order)]
    # Execute
    for thread in threads:
        thread.start()
        time.sleep(0.02)
    for thread in threads:
        thread.join(5)
    # Assert
    assert taken == order


def test_with_workers_devices_overlap_but_start_and_deliver_in_order_and_the_server_computes_alone() -> None:
    # Prepare: three devices, two workers; "c" asks first and "a" computes longest.
    turns = SequentialTurns(["a", "b", "c"], workers=2)
    events: list[str] = []
    lock = threading.Lock()
    computing: set[str] = set()
    most = [0]

    def device(who: str, seconds: float) -> None:
        with turns.take(who, 0):
            with lock:
                events.append(f"start {who}")
                computing.add(who)
                most[0] = max(most[0], len(computing))
            time.sleep(seconds)
            with lock:
                computing.discard(who)
        with turns.deliver(who, 0):
            with lock:
                events.append(f"deliver {who}")

    threads = [threading.Thread(target=device, args=(who, seconds)) for who, seconds in (("c", 0.01), ("b", 0.01), ("a", 0.2))]
    # Execute
    for thread in threads:
        thread.start()
        time.sleep(0.02)
    with turns.take(SERVER, 0):  # waits until no device computes
        server_saw = set(computing)
    for thread in threads:
        thread.join(5)
    # Assert
    assert [e for e in events if e.startswith("start")] == ["start a", "start b", "start c"]
    assert [e for e in events if e.startswith("deliver")] == ["deliver a", "deliver b", "deliver c"]
    assert most[0] == 2, "two workers should let two devices compute at once"
    assert server_saw == set()


def test_a_device_that_left_is_not_waited_for_and_the_server_needs_no_place() -> None:
    turns = SequentialTurns(["a", "b"])
    turns.leave("a")
    done = threading.Event()

    def b() -> None:
        with turns.take("b", JOINING):
            done.set()

    thread = threading.Thread(target=b)
    thread.start()
    assert done.wait(5), "b waited for a device that had left"
    with turns.take(SERVER, 0):
        pass
    with pytest.raises(ValueError, match="no place"):
        with turns.take("stranger", 0):
            pass


def test_own_random_streams_do_not_depend_on_how_participants_interleave() -> None:
    # Prepare: what each stream gives alone.
    alone = {}
    for seed in (1, 2):
        with OwnRandom(seed):
            alone[seed] = [torch.rand(3) for _ in range(2)]
    first, second = OwnRandom(1), OwnRandom(2)
    torch.manual_seed(123)
    outside_expected = torch.rand(2)
    torch.manual_seed(123)
    # Execute: interleave them, with draws outside in between.
    got = {1: [], 2: []}
    with first:
        got[1].append(torch.rand(3))
    with second:
        got[2].append(torch.rand(3))
    outside = torch.rand(2)
    with first:
        got[1].append(torch.rand(3))
    with second:
        got[2].append(torch.rand(3))
    # Assert
    for seed in (1, 2):
        assert all(torch.equal(a, b) for a, b in zip(alone[seed], got[seed]))
    assert torch.equal(outside, outside_expected), "the surrounding stream moved"
    with pytest.raises(RuntimeError, match="re-entrant"):
        with first, first:
            pass


def _config(seed: int, fleet: dict[str, int] = FLEET) -> ServerConfig:
    values = dict(rounds=2, seed=seed, public_size=48, feature_dim=16, batch_size=16, max_private=40, max_test=32,
                  local_epochs=1, alpha=1.0, device="cpu", join_timeout_s=60,
                  threads=1)  # the same torch threads in every run: a matmul's sums may differ with their number
    return build_config(ServerConfig, dict(values, **simulation_config(ServerConfig(), fleet)))


@pytest.fixture(scope="module")
def twice(tmp_path_factory: pytest.TempPathFactory) -> list[tuple[list[dict], Path]]:
    """The same command twice: once with one worker, once with two (devices training at the same time)."""
    runs = []
    for name, workers in (("first", 1), ("second", 2)):
        run_dir = tmp_path_factory.mktemp(name)
        records = run_simulation(_config(seed=3), FLEET, run_dir, ["batch_size=16"], workers=workers)
        runs.append((records, run_dir))
    return runs


def test_the_same_seed_gives_the_same_metrics_but_for_timings_with_any_number_of_workers(twice) -> None:
    (first, first_dir), (second, second_dir) = twice
    lines = [[json.loads(line) for line in (d / METRICS_FILE).read_text().splitlines()] for d in (first_dir, second_dir)]
    assert len(lines[0]) == 2
    assert without_timings(lines[0]) == without_timings(lines[1])
    # Not vacuous: the records hold every device's metrics and losses, and timings that did differ.
    assert set(lines[0][-1]["clients"]) == {c.client_id for c in device_configs(_config(3), FLEET)}
    assert all(client["losses"]["task"] > 0 for client in lines[0][-1]["clients"].values())
    assert lines[0][0]["timings"] != lines[1][0]["timings"]


def test_another_seed_gives_other_numbers(twice, tmp_path: Path) -> None:
    records = run_simulation(_config(seed=4, fleet={"image": 1}), {"image": 1}, tmp_path)
    (first, _), _ = twice
    assert records[-1]["server"]["r1_sum"] != first[-1]["server"]["r1_sum"] or \
        records[-1]["server"]["stage1_loss"] != first[-1]["server"]["stage1_loss"]


def test_devices_get_the_fleets_architectures_and_partitions_and_keep_their_state_on_disk(twice) -> None:
    (_, run_dir), _ = twice
    configs = {c.client_id: c for c in device_configs(_config(3), FLEET, ["batch_size=16"])}
    assert [configs["image-0"].image_arch, configs["image-1"].image_arch] == ["effnet_linear", "cnn_small"]
    assert (configs["image-1"].partition, configs["image-1"].num_partitions) == (1, 2)
    assert configs["text-0"].batch_size == 16 and configs["text-0"].threads == 0
    for client_id in configs:
        assert (run_dir / "clients" / client_id / "client_state.safetensors").is_file()


def test_a_devices_own_training_settings_reach_its_optimiser_and_its_rounds(tmp_path: Path, monkeypatch) -> None:
    # Prepare: spies on what the device app builds its optimiser and each round with (the production calls).
    from fedafd.edge_client import app
    from fedafd.edge_client.training import Optimizers, prepare_round

    created, prepared = [], []
    monkeypatch.setattr(app.Optimizers, "create", staticmethod(
        lambda model, lr, disc_lr, fusion_lr=0.0: created.append(fusion_lr) or Optimizers(
            task=torch.optim.Adam(model.parameters(), lr=lr), discriminator=torch.optim.Adam([torch.zeros(1)]))))
    monkeypatch.setattr(app, "prepare_round", lambda *args, **kwargs: prepared.append(args[-1]) or
                        prepare_round(*args, **kwargs))
    # Execute: one device, one round, its settings given as `--local-set` gives them.
    run_simulation(_config(seed=5, fleet={"image": 1}), {"image": 1}, tmp_path,
                   ["fusion_lr=0.2", "local_task_weight=0.5"])
    # Assert
    assert created and set(created) == {0.2} and prepared and set(prepared) == {0.5}
