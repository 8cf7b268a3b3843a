import numpy as np
import pytest
from PIL import Image

from amgen_core.image_io import (
    CorruptImageError, ImageModeError, SizeMismatchError, check_same_size, decode_png, encode_png,
    image_size, read_image, read_label_png,
)


def test_png_round_trip_keeps_values_and_dtypes():
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, (6, 9, 3), dtype=np.uint8)
    ids = rng.integers(0, 34, (6, 9)).astype(np.uint8)
    inst = (ids.astype(np.int32) * 1000 + 7)
    assert np.array_equal(decode_png(encode_png(rgb)), rgb)
    out = decode_png(encode_png(ids))
    assert out.dtype == np.uint8 and np.array_equal(out, ids)
    out = decode_png(encode_png(inst))
    assert out.dtype == np.uint16 and np.array_equal(out, inst)
    assert image_size(encode_png(rgb)) == (6, 9)


def test_encode_png_is_deterministic_and_metadata_free():
    ids = np.arange(60, dtype=np.uint8).reshape(6, 10) % 34
    a, b = encode_png(ids), encode_png(ids.copy())
    assert a == b
    assert b"tIME" not in a and b"tEXt" not in a


def test_encode_rejects_what_png_cannot_hold():
    with pytest.raises(ValueError, match="16-bit"):
        encode_png(np.full((2, 2), 70000, np.int32), where="inst.png")
    with pytest.raises(ValueError, match="cannot encode"):
        encode_png(np.zeros((2, 2, 4), np.uint8))


def test_read_errors_name_the_file(tmp_path):
    missing = tmp_path / "nope.png"
    with pytest.raises(FileNotFoundError, match="nope.png"):
        read_image(missing)
    bad = tmp_path / "bad.png"
    good = encode_png(np.zeros((8, 8, 3), np.uint8))
    bad.write_bytes(good[:30])  # truncated
    with pytest.raises(CorruptImageError, match="bad.png"):
        read_image(bad)
    rgb = tmp_path / "rgb.png"
    rgb.write_bytes(good)
    with pytest.raises(ImageModeError, match="rgb.png.*single-channel"):
        read_label_png(rgb)
    with pytest.raises(CorruptImageError, match="not a PNG"):
        decode_png(b"GIF89a....", where="x")


def test_read_image_converts_modes(tmp_path):
    Image.fromarray(np.full((4, 5), 77, np.uint8)).save(tmp_path / "g.jpg")
    arr = read_image(tmp_path / "g.jpg")
    assert arr.shape == (4, 5, 3) and arr.dtype == np.uint8
    p = Image.fromarray(np.array([[0, 1], [2, 1]], np.uint8)).convert("P")
    p.putpalette([0, 0, 0, 255, 0, 0, 0, 255, 0] + [0] * 759)
    p.save(tmp_path / "p.png")
    assert read_label_png(tmp_path / "p.png").tolist() == [[0, 1], [2, 1]]


def test_size_mismatch_names_where():
    with pytest.raises(SizeMismatchError, match="here.*4x5 vs 4x6"):
        check_same_size(np.zeros((4, 5, 3)), np.zeros((4, 6)), "here")
    assert issubclass(SizeMismatchError, ValueError) and issubclass(CorruptImageError, ValueError)
