"""`fedafd-edge infer`: ONNX Runtime only (never torch), same top-1 as PyTorch, clear errors."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from fedafd.edge_client.cli import app
from fedafd.export.infer import InputError, ModelError, OnnxModel, TextPreprocessor, load_image, read_manifest
from fedafd.export.onnx_export import client_test_split, load_client
from fedafd.runtime.data.datasets import load_tuxpaint_pairs
from fedafd.runtime.data.text import tokenize, tokenizer_path

runner = CliRunner()


def torch_probs(state: Path, kind: str, inputs: tuple[np.ndarray, ...]) -> np.ndarray:
    client = load_client(state)
    with torch.no_grad():
        tensors = tuple(torch.from_numpy(a) for a in inputs)
        fused = client.model.fuse(kind, client.model.encode(kind, tensors), client.towers.encode(kind, tensors))
        return torch.softmax(client.model.head(fused), dim=-1).numpy()


def write_pngs(images: np.ndarray, folder: Path) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, image in enumerate(images):
        path = folder / f"sample{i}.png"
        Image.fromarray(image.transpose(1, 2, 0)).save(path)  # (3, H, W) -> (H, W, 3)
        paths.append(path)
    return paths


def test_tokenizer_without_transformers_gives_the_projects_ids() -> None:
    # Prepare
    texts = ["a large dog with a long tail", "", "Ünïcode café, naïve résumé!",
             "word " * 60, "a man's hat (worn) - 3 colours"]

    # Execute
    ids, mask = TextPreprocessor(tokenizer_path() / "tokenizer.json", 32, 0)(texts)
    ref_ids, ref_mask = tokenize(texts)

    # Assert
    np.testing.assert_array_equal(ids, ref_ids)
    np.testing.assert_array_equal(mask, ref_mask)


def test_png_round_trip_is_exact(tmp_path: Path) -> None:
    images = client_test_split("image", {"max_test": 4}).inputs["image"][0]
    paths = write_pngs(images, tmp_path)
    np.testing.assert_array_equal(np.stack([load_image(p) for p in paths]), images)


def test_infer_images_gives_pytorch_top1(exported, tmp_path: Path) -> None:
    # Prepare: real test pictures saved as PNG files
    state, folder = exported["image"]
    images = client_test_split("image", {"max_test": 200}).inputs["image"][0][:8]
    paths = write_pngs(images, tmp_path)
    reference = torch_probs(state, "image", (images.astype(np.float32) / 255.0,))

    # Execute
    result = runner.invoke(app, ["infer", str(folder), *map(str, paths), "--format", "json"])

    # Assert
    assert result.exit_code == 0, result.output
    predictions = json.loads(result.output)["predictions"]
    assert [p["index"] for p in predictions] == reference.argmax(1).tolist()
    labels = read_manifest(folder).labels
    assert [p["label"] for p in predictions] == [labels[i] for i in reference.argmax(1)]
    np.testing.assert_allclose([p["prob"] for p in predictions], reference.max(1), atol=1e-4)


def test_infer_texts_gives_pytorch_top1(exported) -> None:
    state, folder = exported["text"]
    texts = ["a domesticated carnivorous mammal that barks", "a building where people live",
             "a tall perennial woody plant having a main trunk", "a person who writes books"]
    reference = torch_probs(state, "text", tokenize(texts))

    result = runner.invoke(app, ["infer", str(folder), *texts, "--format", "json", "--precision", "int8"])

    assert result.exit_code == 0, result.output
    out = json.loads(result.output)
    assert out["precision"] == "int8"
    fp32 = runner.invoke(app, ["infer", str(folder), *texts, "--format", "json"])
    assert [p["index"] for p in json.loads(fp32.output)["predictions"]] == reference.argmax(1).tolist()


def test_infer_multimodal_ranks_the_matching_caption_as_pytorch_does(exported, tmp_path: Path) -> None:
    # Prepare: 2 pictures and their 4 captions from the test split
    state, folder = exported["multimodal"]
    pairs = load_tuxpaint_pairs("test")
    images, captions = pairs.images[:2], [str(c) for c in pairs.captions[:4]]
    paths = write_pngs(images, tmp_path)
    client = load_client(state)
    with torch.no_grad():
        image = torch.from_numpy(images.astype(np.float32) / 255.0)
        ids, mask = (torch.from_numpy(a) for a in tokenize(captions))
        fi = client.model.fuse("image", client.model.encode("image", (image,)), client.towers.encode("image", (image,)))
        ft = client.model.fuse("text", client.model.encode("text", (ids, mask)), client.towers.encode("text", (ids, mask)))
        scores = (torch.nn.functional.normalize(fi, dim=-1) @ torch.nn.functional.normalize(ft, dim=-1).T).numpy()

    # Execute
    result = runner.invoke(app, ["infer", str(folder), *map(str, paths), *captions, "--format", "json"])

    # Assert
    assert result.exit_code == 0, result.output
    rankings = json.loads(result.output)["rankings"]
    for row, ranking in zip(scores, rankings):
        assert [r["text"] for r in ranking["ranking"]] == [captions[j] for j in np.argsort(-row, kind="stable")]
        np.testing.assert_allclose([r["score"] for r in ranking["ranking"]], np.sort(row)[::-1], atol=1e-4)


def test_infer_never_imports_torch(exported, tmp_path: Path) -> None:
    """The real entry point in a fresh interpreter: the answer comes, and torch never got imported."""
    _, folder = exported["text"]
    script = (
        "import sys\n"
        "from fedafd.edge_client.cli import app\n"
        "try:\n"
        f"    app(['infer', {str(folder)!r}, 'a dog that barks', '--format', 'json'])\n"
        "except SystemExit as exit:\n"
        "    assert exit.code in (0, None), exit.code\n"
        "print('TORCH_LOADED', 'torch' in sys.modules, 'transformers' in sys.modules)\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "TORCH_LOADED False False" in done.stdout
    assert json.loads(done.stdout[:done.stdout.rindex("TORCH_LOADED")])["predictions"][0]["input"] == "a dog that barks"


def test_cli_entry_point_subprocess(exported) -> None:
    _, folder = exported["image"]
    done = subprocess.run([sys.executable, "-m", "fedafd.edge_client.cli", "infer", str(folder), "--help"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and "ONNX Runtime" in done.stdout


def copy_model(folder: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "model"
    shutil.copytree(folder, copy)
    return copy


def test_corrupt_model_file_is_a_clear_error(exported, tmp_path: Path) -> None:
    # Prepare: flip bytes in the middle of the graph
    model = copy_model(exported["image"][1], tmp_path)
    graph = model / "image.onnx"
    data = bytearray(graph.read_bytes())
    data[len(data) // 2:len(data) // 2 + 64] = b"\xff" * 64
    graph.write_bytes(bytes(data))
    images = np.zeros((1, 3, 32, 32), np.uint8)

    # Execute / Assert: caught by the manifest's checksum, and by ONNX Runtime without it (truncated file)
    with pytest.raises(ModelError, match="corrupt"):
        OnnxModel(model).images(images)
    graph.write_bytes(bytes(data[:1000]))
    with pytest.raises(ModelError, match="ONNX Runtime cannot load"):
        OnnxModel(model, verify_files=False).images(images)
    result = runner.invoke(app, ["infer", str(model), str(tmp_path / "x.png")])
    assert result.exit_code == 2


def test_missing_model_is_a_clear_error(exported, tmp_path: Path) -> None:
    with pytest.raises(ModelError, match="fedafd-edge export"):
        OnnxModel(tmp_path / "nowhere")
    model = copy_model(exported["text"][1], tmp_path)
    (model / "text.onnx").unlink()
    with pytest.raises(ModelError, match="missing"):
        OnnxModel(model).texts(["a dog"])
    (model / "tokenizer.json").unlink()
    with pytest.raises(ModelError, match="tokenizer"):
        OnnxModel(model).texts(["a dog"])


def test_wrong_input_shape_is_a_clear_error(exported, tmp_path: Path) -> None:
    model = OnnxModel(exported["image"][1])
    with pytest.raises(InputError, match=r"shape \(batch, 3, 32, 32\), got \(2, 3, 28, 28\)"):
        model.images(np.zeros((2, 3, 28, 28), np.uint8))
    with pytest.raises(InputError, match="must be float32"):
        model.run("image", np.zeros((1, 3, 32, 32), dtype=bool))
    text = OnnxModel(exported["text"][1])
    with pytest.raises(InputError, match="at most 32"):
        text.run("text", np.ones((1, 40), np.int64), np.ones((1, 40), np.int64))
    np.save(tmp_path / "bad.npy", np.zeros((2, 28, 28), np.uint8))
    result = runner.invoke(app, ["infer", str(exported["image"][1]), str(tmp_path / "bad.npy")])
    assert result.exit_code == 2 and "shape" in result.output


def test_unreadable_image_is_a_clear_error(exported, tmp_path: Path) -> None:
    fake = tmp_path / "broken.png"
    fake.write_text("this is not a picture")
    result = runner.invoke(app, ["infer", str(exported["image"][1]), str(fake)])
    assert result.exit_code == 2
    assert "cannot read image" in result.output and "broken.png" in result.output
    result = runner.invoke(app, ["infer", str(exported["image"][1]), "no such file.png"])
    assert result.exit_code == 2 and "error:" in result.output
