"""The one image format: grayscale padding, PIL pictures composited on white and fitted, float scaling."""

import numpy as np
import pytest
from PIL import Image

from fedafd.runtime.data.images import IMAGE_SIZE, from_grayscale_28, from_pil, to_float

RED = (255, 0, 0)


def test_grayscale_28_is_padded_and_replicated():
    # Prepare: two 28x28 images with distinct values
    batch = np.arange(2 * 28 * 28, dtype=np.int64).reshape(2, 28, 28).astype(np.uint8)
    # Execute
    out = from_grayscale_28(batch)
    # Assert: 2 px of zeros around, the picture in the middle, three identical channels
    assert out.shape == (2, 3, IMAGE_SIZE, IMAGE_SIZE) and out.dtype == np.uint8
    assert np.array_equal(out[:, :, 2:30, 2:30], np.repeat(batch[:, None], 3, axis=1))
    border = out.copy()
    border[:, :, 2:30, 2:30] = 0
    assert not border.any()


@pytest.mark.parametrize("bad", [np.zeros((2, 28, 28), np.float32), np.zeros((2, 32, 32), np.uint8),
                                 np.zeros((28, 28), np.uint8)])
def test_grayscale_28_refuses_other_inputs(bad):
    with pytest.raises(ValueError, match="28, 28"):
        from_grayscale_28(bad)


def test_opaque_square_fills_the_canvas():
    out = from_pil(Image.new("RGB", (100, 100), RED))
    assert out.shape == (3, 32, 32) and out.dtype == np.uint8
    assert np.array_equal(out, np.broadcast_to(np.array(RED, np.uint8)[:, None, None], (3, 32, 32)))


def test_wide_picture_keeps_its_aspect_and_is_centred_on_white():
    # 64x16 -> 32x8, pasted at rows (32 - 8) // 2 = 12 .. 19
    out = from_pil(Image.new("RGB", (64, 16), RED))
    rows_with_red = np.flatnonzero((out[1] < 128).any(axis=1))  # green channel low = red
    assert rows_with_red.tolist() == list(range(12, 20))
    assert (out[:, :12] == 255).all() and (out[:, 20:] == 255).all()


def test_tall_picture_is_centred_horizontally():
    out = from_pil(Image.new("RGB", (8, 32), RED))
    cols_with_red = np.flatnonzero((out[1] < 128).any(axis=0))
    assert cols_with_red.tolist() == list(range(12, 20))


@pytest.mark.parametrize(
    "img",
    [
        Image.new("RGBA", (40, 40), (0, 0, 0, 0)),
        Image.new("LA", (40, 40), (0, 0)),
    ],
    ids=["RGBA", "LA"],
)
def test_transparent_pictures_become_white(img):
    assert (from_pil(img) == 255).all()


def test_palette_picture_with_a_transparent_index_is_composited():
    # Prepare: palette index 0 black (transparent), index 1 red; left half index 0, right half index 1
    img = Image.new("P", (32, 32), 0)
    img.putpalette([0, 0, 0, 255, 0, 0] + [0, 0, 0] * 254)
    img.paste(1, (16, 0, 32, 32))
    img.info["transparency"] = 0
    # Execute
    out = from_pil(img)
    # Assert: transparent black is white, red stays red
    assert (out[:, :, :16] == 255).all()
    assert (out[:, :, 16:] == np.array(RED, np.uint8)[:, None, None]).all()


def test_half_transparent_black_is_grey():
    out = from_pil(Image.new("RGBA", (32, 32), (0, 0, 0, 128)))
    assert np.abs(out.astype(int) - 127).max() <= 1


def test_to_float_scales_to_unit_range():
    batch = np.array([[[[0, 51, 255]]]], dtype=np.uint8)
    out = to_float(batch)
    assert out.dtype == np.float32 and out.shape == batch.shape
    assert out.ravel().tolist() == pytest.approx([0.0, 0.2, 1.0])
    with pytest.raises(ValueError, match="uint8"):
        to_float(out)
