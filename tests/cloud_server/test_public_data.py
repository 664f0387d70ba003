"""The server's public set and task from its config: public_subset's row ids, and what P is drawn from."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from fedafd.cloud_server.app import ServerApp
from fedafd.cloud_server.public_data import candidate_rows, read_subset
from fedafd.runtime.config import ServerConfig, build_config
from fedafd.runtime.data.sources.records import DataFormatError
from fedafd.runtime.transport import InprocHub


@pytest.mark.parametrize("text", ["5\n1\n# a comment\n\n3\n", "[5, 1, 3]"])
def test_a_subset_file_gives_sorted_row_ids(tmp_path: Path, text: str) -> None:
    (tmp_path / "ids.txt").write_text(text)
    assert read_subset(tmp_path / "ids.txt", pool_size=10).tolist() == [1, 3, 5]


@pytest.mark.parametrize("text, match", [
    ("1\ntwo\n", r"ids.txt, row 2: 'two' is not an integer row id"),
    ("1\n10\n", r"ids.txt, row 2: row id 10 is outside the public set's 10 rows"),
    ("4\n4\n", r"ids.txt, row 2: row id 4 is listed twice"),
    ("[1, 2.5]", r"ids.txt, row 2: 2.5 is not an integer row id"),
    ("# nothing\n", r"ids.txt: no row ids"),
])
def test_a_bad_subset_file_names_the_row(tmp_path: Path, text: str, match: str) -> None:
    (tmp_path / "ids.txt").write_text(text)
    with pytest.raises(DataFormatError, match=match):
        read_subset(tmp_path / "ids.txt", pool_size=10)


def test_the_server_draws_p_from_the_subset_only(tmp_path: Path) -> None:
    # Prepare: 40 row ids of the bundled public set; P of 16 rows drawn from them, then the whole subset.
    ids = np.arange(3, 1400, 35)
    (tmp_path / "ids.txt").write_text("\n".join(map(str, ids)))
    values = dict(image_arch="cnn_small", text_arch="gru", feature_dim=16, public_subset=str(tmp_path / "ids.txt"))
    # Execute
    drawn = ServerApp(build_config(ServerConfig, dict(values, public_size=16)), InprocHub().server(), tmp_path / "a")
    whole = ServerApp(build_config(ServerConfig, dict(values, public_size=0)), InprocHub().server(), tmp_path / "b")
    # Assert: the round's rows index the whole public set, and come from the subset alone.
    assert len(drawn.public_rows) == 16 and set(drawn.public_rows) <= set(ids)
    assert whole.public_rows.tolist() == ids.tolist() and len(whole.public_all) == 1496
    assert candidate_rows(ServerConfig(), 7).tolist() == list(range(7))
    drawn.close()
    whole.close()


def test_serve_refuses_a_bad_public_set_before_it_binds_or_writes_a_run_folder(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from fedafd.cloud_server.cli import app

    # Prepare: a public set whose second caption row points at a picture that is not there.
    folder = tmp_path / "public"
    folder.mkdir()
    from PIL import Image

    Image.new("RGB", (8, 8), (200, 30, 30)).save(folder / "a.png")
    (folder / "metadata.jsonl").write_text('{"file_name": "a.png", "text": "a cat"}\n'
                                           '{"file_name": "b.png", "text": "a dog"}\n')
    # Execute
    result = CliRunner().invoke(app, ["serve", "--insecure", "--out", str(tmp_path / "run"), "-c",
                                      f"public_data={folder}", "-c", "eval_data=demo:emoji"])
    # Assert: one error line naming the file and row; nothing written.
    assert result.exit_code != 0 and "metadata.jsonl" in result.output and "row 2" in result.output
    assert not (tmp_path / "run").exists()
