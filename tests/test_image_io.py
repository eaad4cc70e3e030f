"""Image loading: every colour mode and orientation equals the reference's pixels; bad input is refused."""

from __future__ import annotations

import base64
import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image, ImageOps
from transformers.image_transforms import convert_to_rgb

from board.errors import ImageError
from board.image_io import image_from_array, load_image, probe

RNG = np.random.default_rng(7)
BASE = RNG.integers(0, 256, (37, 53, 3), dtype=np.uint8)  # non-square: orientation swaps are visible
ALPHA = RNG.integers(0, 256, (37, 53), dtype=np.uint8)


def encode(im: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    im.save(buf, fmt, **kw)
    return buf.getvalue()


def reference_pixels(data: bytes) -> np.ndarray:
    """The oracle: transformers' load_image orientation, then the processor's convert_to_rgb."""
    im = ImageOps.exif_transpose(Image.open(io.BytesIO(data)))
    return convert_to_rgb(im, return_numpy=True)


def _cases() -> dict[str, bytes]:
    rgb = Image.fromarray(BASE)
    rgba = Image.fromarray(np.dstack([BASE, ALPHA]))
    cases = {
        "jpeg-rgb": encode(rgb, "JPEG", quality=90),
        "jpeg-gray": encode(rgb.convert("L"), "JPEG"),
        "jpeg-cmyk": encode(rgb.convert("CMYK"), "JPEG"),
        "png-rgb": encode(rgb, "PNG"),
        "png-rgba": encode(rgba, "PNG"),
        "png-gray": encode(rgb.convert("L"), "PNG"),
        "png-gray-alpha": encode(Image.fromarray(np.dstack([BASE[..., 0], ALPHA]), "LA"), "PNG"),
        "png-palette": encode(rgb.convert("P"), "PNG"),
        "png-palette-trns": encode(rgb.convert("P"), "PNG", transparency=5),
        "png-rgb-trns": encode(rgb, "PNG", transparency=tuple(int(v) for v in BASE[0, 0])),
        "png-bilevel": encode(rgb.convert("1"), "PNG"),
        "png-rgb16": encode(Image.fromarray(BASE), "PNG"),  # replaced below by a real 48-bit PNG
        "webp-lossy": encode(rgb, "WEBP", quality=90),
        "webp-rgba": encode(rgba, "WEBP", lossless=True),
        "bmp": encode(rgb, "BMP"),
        "gif": encode(rgb.convert("P"), "GIF"),
        "tiff": encode(rgb, "TIFF"),
    }
    import cv2

    wide = (BASE.astype(np.uint16) * 257 + RNG.integers(0, 257, BASE.shape).astype(np.uint16))
    cases["png-rgb16"] = cv2.imencode(".png", wide[:, :, ::-1])[1].tobytes()
    for orientation in range(1, 9):
        exif = Image.Exif()
        exif[0x0112] = orientation
        cases[f"jpeg-exif{orientation}"] = encode(rgb, "JPEG", exif=exif.tobytes())
        cases[f"png-exif{orientation}"] = encode(rgb, "PNG", exif=exif.tobytes())
        cases[f"webp-exif{orientation}"] = encode(rgb, "WEBP", exif=exif.tobytes(), lossless=True)
    return cases


CASES = _cases()


@pytest.mark.parametrize("name", sorted(CASES))
def test_pixels_equal_reference(name):
    data = CASES[name]
    ours = load_image(data)
    ref = reference_pixels(data)
    assert ours.dtype == np.uint8 and ours.shape == ref.shape
    assert np.array_equal(ours, ref), f"max diff {np.abs(ours.astype(int) - ref).max()}"


def test_orientation_is_applied():
    exif = Image.Exif()
    exif[0x0112] = 6  # camera held upright: stored sideways, displayed rotated 90 degrees clockwise
    img = load_image(encode(Image.fromarray(BASE), "PNG", exif=exif.tobytes()))
    assert img.shape == (53, 37, 3)
    assert np.array_equal(img, np.rot90(BASE, k=-1))


def test_sixteen_bit_gray_keeps_its_range_where_pillow_clips():
    """Deliberate deviation (documented in board/image_io.py): Pillow clips I;16 to 255."""
    import cv2

    gray16 = np.linspace(0, 65535, 64 * 16).reshape(16, 64).astype(np.uint16)
    data = cv2.imencode(".png", gray16)[1].tobytes()
    ref = reference_pixels(data)
    assert (ref[:, 8:] == 255).all(), "Pillow no longer clips 16-bit gray: drop the deviation"
    ours = load_image(data)
    expected = np.repeat((gray16 >> 8).astype(np.uint8)[:, :, None], 3, axis=2)
    assert np.array_equal(ours, expected)


def test_path_bytes_and_data_uri_agree(tmp_path):
    data = CASES["png-rgba"]
    path = tmp_path / "x.png"
    path.write_bytes(data)
    uri = "data:image/png;base64," + base64.b64encode(data).decode()
    a, b, c = load_image(path), load_image(str(path)), load_image(uri)
    assert np.array_equal(a, b) and np.array_equal(b, c) and np.array_equal(c, load_image(data))


def _png_header(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height with almost no data: a decompression bomb's shape."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 16)) + chunk(b"IEND", b"")


@pytest.mark.parametrize(
    "source, message",
    [
        (b"", "empty"),
        (b"definitely not an image", "not an image"),
        (CASES["jpeg-rgb"][:200], "corrupt"),
        (_png_header(12000, 12000), "limit is 120 MP"),
        (_png_header(60000, 60000), "refusing"),
        ("data:image/png;base64,@@@", "base64"),
        ("data:image/png,rawdata", "base64"),
    ],
    ids=["empty", "garbage", "truncated", "too-many-pixels", "bomb", "bad-base64", "not-base64"],
)
def test_bad_input_is_refused_clearly(source, message):
    with pytest.raises(ImageError, match=message):
        load_image(source)


def test_missing_file_and_folder(tmp_path):
    with pytest.raises(ImageError, match="not found"):
        load_image(tmp_path / "nope.jpg")
    with pytest.raises(ImageError, match="folder"):
        load_image(tmp_path)


def test_only_regular_files_are_read_and_reads_are_bounded(tmp_path):
    """A FIFO would block the read until someone writes, /dev/zero would never end: both are refused
    before a byte is read, by the one rule the CLI and the server share."""
    import os
    import threading

    from board.errors import InputError
    from board.image_io import read_regular_file, require_regular_file

    fifo = tmp_path / "pipe.png"
    os.mkfifo(fifo)
    done = threading.Event()

    def read_fifo() -> None:
        with pytest.raises(ImageError, match="is a FIFO"):
            load_image(fifo)
        done.set()

    threading.Thread(target=read_fifo, daemon=True).start()
    assert done.wait(5), "reading a FIFO blocked"
    with pytest.raises(ImageError, match="/dev/zero is a character device"):
        load_image("/dev/zero")
    with pytest.raises(ImageError, match="is a FIFO"):
        require_regular_file(fifo)
    with pytest.raises(InputError, match="is a folder, not a regular video file"):
        require_regular_file(tmp_path, "video")
    big = tmp_path / "big.png"
    big.write_bytes(b"x" * 1000)
    with pytest.raises(ImageError, match="limit"):
        read_regular_file(big, max_bytes=999)
    assert read_regular_file(big, max_bytes=1000) == b"x" * 1000
    with pytest.raises(ImageError, match="limit"):  # a data: URI too large is refused before it is decoded
        load_image("data:image/png;base64," + "A" * 4000, max_bytes=1000)


def test_limits_are_settable():
    data = CASES["png-rgb"]
    with pytest.raises(ImageError, match="limit"):
        load_image(data, max_pixels=100)
    with pytest.raises(ImageError, match="limit"):
        load_image(data, max_bytes=10)
    assert probe(data).width == 53


def test_arrays_are_accepted_as_frames():
    assert np.array_equal(image_from_array(BASE), BASE)
    gray = image_from_array(BASE[..., 0])
    assert gray.shape == BASE.shape and (gray[..., 0] == gray[..., 2]).all()
    with pytest.raises(ImageError):
        image_from_array(np.zeros((0, 4, 3), np.uint8))
    with pytest.raises(ImageError):
        image_from_array(BASE.astype(np.float32))


def test_compositing_on_white_is_the_integer_formula_for_every_value_and_alpha():
    from board.image_io import composite_on_white

    v, a = np.meshgrid(np.arange(256, dtype=np.uint16), np.arange(256, dtype=np.uint16))
    expected = ((v * a + 255 * (255 - a) + 127) // 255).astype(np.uint8)
    rgba = np.stack([v, 255 - v, v, a], -1).astype(np.uint8)
    out = composite_on_white(rgba)
    assert out.shape == (256, 256, 3) and out.dtype == np.uint8
    assert np.array_equal(out[..., 0], expected) and np.array_equal(out[..., 2], expected)
    assert np.array_equal(out[..., 1], expected[:, ::-1])
    assert np.array_equal(composite_on_white(rgba[::3, 1::2]), out[::3, 1::2])  # a view, not contiguous
