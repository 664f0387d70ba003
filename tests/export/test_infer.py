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

from fedafd.export.cli import fedafd_edge as app
from fedafd.export.infer import InputError, ModelError, OnnxModel, TextPreprocessor, load_image, read_manifest
from fedafd.export.onnx_export import client_graphs, client_test_split, load_client, training_outputs
from fedafd.runtime.data.tuxpaint import load_tuxpaint_pairs
from fedafd.runtime.data.text import tokenize, tokenizer_path

runner = CliRunner()


def torch_outputs(state: Path, modality: str, inputs: tuple[np.ndarray, ...]) -> tuple[np.ndarray, ...]:
    """The exported graph's PyTorch module (backbones included) on raw inputs: its outputs in graph order."""
    graph = client_graphs(load_client(state))[modality]
    with torch.no_grad():
        out = graph(*(torch.from_numpy(a) for a in inputs))
    return tuple(t.numpy() for t in (out if isinstance(out, tuple) else (out,)))


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


def test_infer_images_gives_the_training_paths_top1(exported, tmp_path: Path) -> None:
    # Prepare: real test pictures saved as PNG files; the reference is what evaluation computes for
    # them (the tower's EfficientNet features from the cache)
    state, folder = exported["image"]
    client = load_client(state)
    data = client_test_split("image", {"max_test": 200}, client.backbone_names(True))
    images = data.inputs["image"][0][:8]
    paths = write_pngs(images, tmp_path)
    reference = training_outputs(client, "image", True, data, np.arange(8))[0]

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
    reference = torch_outputs(state, "text", tokenize(texts))[0]

    result = runner.invoke(app, ["infer", str(folder), *texts, "--format", "json", "--precision", "int8"])

    assert result.exit_code == 0, result.output
    out = json.loads(result.output)
    assert out["precision"] == "int8"
    fp32 = runner.invoke(app, ["infer", str(folder), *texts, "--format", "json"])
    assert [p["index"] for p in json.loads(fp32.output)["predictions"]] == reference.argmax(1).tolist()


def test_infer_multimodal_ranks_the_matching_caption_as_pytorch_does(exported, tmp_path: Path) -> None:
    # Prepare: 2 pictures and their 4 captions from the test split; EfficientNet and MiniLM run in the graphs
    state, folder = exported["multimodal"]
    pairs = load_tuxpaint_pairs("test")
    images, captions = pairs.images[:2], [str(c) for c in pairs.captions[:4]]
    paths = write_pngs(images, tmp_path)
    (image_features,) = torch_outputs(state, "image", (images.astype(np.float32) / 255.0,))
    (text_features,) = torch_outputs(state, "text", tokenize(captions))
    scores = image_features @ text_features.T

    # Execute
    result = runner.invoke(app, ["infer", str(folder), *map(str, paths), *captions, "--format", "json"])

    # Assert
    assert result.exit_code == 0, result.output
    rankings = json.loads(result.output)["rankings"]
    for row, ranking in zip(scores, rankings):
        assert [r["text"] for r in ranking["ranking"]] == [captions[j] for j in np.argsort(-row, kind="stable")]
        np.testing.assert_allclose([r["score"] for r in ranking["ranking"]], np.sort(row)[::-1], atol=1e-4)


@pytest.mark.parametrize("precision", ["fp32", "int8"])
def test_infer_never_imports_torch(exported, tmp_path: Path, precision: str) -> None:
    """The real entry point in a fresh interpreter, on the graphs with EfficientNet and MiniLM inside:
    the answer comes, and neither torch nor transformers got imported."""
    _, folder = exported["multimodal"]
    (path,) = write_pngs(load_tuxpaint_pairs("test").images[:1], tmp_path)
    script = (
        "import sys\n"
        "from fedafd.export.cli import fedafd_edge as app\n"
        "try:\n"
        f"    app(['infer', {str(folder)!r}, {str(path)!r}, 'a dog that barks', 'a red apple', '--format', 'json',"
        f" '--precision', {precision!r}])\n"
        "except SystemExit as exit:\n"
        "    assert exit.code in (0, None), exit.code\n"
        "print('TORCH_LOADED', 'torch' in sys.modules, 'transformers' in sys.modules)\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "TORCH_LOADED False False" in done.stdout
    out = json.loads(done.stdout[:done.stdout.rindex("TORCH_LOADED")])
    assert out["precision"] == precision
    assert {r["text"] for r in out["rankings"][0]["ranking"]} == {"a dog that barks", "a red apple"}


def test_cli_entry_point_subprocess(exported) -> None:
    _, folder = exported["image"]
    done = subprocess.run([sys.executable, "-m", "fedafd.export.cli", "infer", str(folder), "--help"],
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


def test_a_tower_models_pictures_are_fitted_to_its_size_and_never_mixed_with_uint8_arrays(tmp_path: Path) -> None:
    # Prepare: a model folder whose image graph reads a 24 px tower (stretch), and a 40 x 20 picture.
    manifest = {"format": 1, "kind": "image", "graphs": {},
                "preprocessing": {"image": {"tower": "hf-x", "size": 24, "fit": "stretch", "pad_colour": [0.5] * 3}}}
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    Image.new("RGB", (40, 20), (255, 0, 0)).save(tmp_path / "red.png")
    np.save(tmp_path / "raw.npy", np.zeros((1, 3, 24, 24), np.uint8))
    model = OnnxModel(tmp_path)
    # Execute / Assert: float (1, 3, 24, 24) in [0, 1] as fit_picture makes it; uint8 arrays beside it are refused,
    # not cast to floats of 0-255.
    pictures = model.read_images([tmp_path / "red.png"])
    assert pictures.shape == (1, 3, 24, 24) and pictures.dtype == np.float32
    assert np.allclose(pictures[0, 0], 1.0) and np.allclose(pictures[0, 1:], 0.0)
    with pytest.raises(InputError, match="mix of uint8 and float"):
        model.read_images([tmp_path / "red.png", tmp_path / "raw.npy"])
