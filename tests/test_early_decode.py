"""The early decode of a JPEG's or PNG's top rows (image_io.top_field, image_io.decode_top) and the tile stream
built on it (tiles.start_decode, tiles.stream_tiles): the same rows as the whole decode, the same tiles
as cutting the decoded image, taken only where it applies, and right even when the early rows are wrong."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

import board.tiles as tiles_module
from board.image_io import apply_orientation, decode, decode_top, jpeg_frame, png_header, probe, top_band
from board.tiles import (SplitSettings, cut_tiles, plan_decode, split_bytes, start_decode, stream_tiles,
                         upright_window)
from support import photo_pixels

SETTINGS = SplitSettings(longest_edge=2048, tile=512)


def jpeg(img: np.ndarray, **save: object) -> bytes:
    out = io.BytesIO()
    Image.fromarray(img).save(out, "JPEG", quality=90, **save)
    return out.getvalue()


def with_orientation(data: bytes, orientation: int) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = orientation
    out = io.BytesIO()
    Image.open(io.BytesIO(data)).save(out, "JPEG", quality=90, exif=exif.tobytes())
    return out.getvalue()


def serial_tiles(data: bytes) -> tuple[list[np.ndarray], object]:
    """The oracle: the whole file decoded upright, then cut_tiles; (tiles, plan)."""
    info, plan, chosen, reduction = plan_decode(data, SETTINGS)
    return list(cut_tiles(decode(data, info, reduce=reduction), plan, chosen)), plan


@pytest.fixture(scope="module")
def big() -> bytes:
    return jpeg(photo_pixels(1200, 1600))


@pytest.fixture
def early_for_small_images(monkeypatch):
    """The early decode for the test's 2 MP photos (the threshold is for 12 MP ones)."""
    monkeypatch.setattr(tiles_module, "EARLY_DECODE_MIN_PIXELS", 0)


@pytest.mark.parametrize("kind, save, mcu", [("4:2:0", {}, 16), ("4:4:4", {"subsampling": 0}, 8),
                                              ("4:2:2", {"subsampling": 1}, 8), ("gray", {}, 8)])
def test_the_top_rows_are_the_whole_decodes_rows(kind, save, mcu):
    img = photo_pixels(300, 410)
    data = jpeg(img[:, :, 0] if kind == "gray" else img, **save)
    frame, info = jpeg_frame(data), probe(data)
    assert frame is not None and (frame.height, frame.row_step) == (300, mcu)
    whole = decode(data, info)
    for rows in (1, 15, 16, 17, 150, 250):
        top = decode_top(data, info, rows)
        assert top is not None and top.shape == (rows, 410, 3) and np.array_equal(top, whole[:rows]), rows
    assert decode_top(data, info, 290) is None  # no rows to save: the whole decode is as fast


def png(img: np.ndarray, mode: str = "RGB", **save: object) -> bytes:
    out = io.BytesIO()
    Image.fromarray(img).convert(mode).save(out, "PNG", **save)
    return out.getvalue()


@pytest.mark.parametrize("mode", ["RGB", "RGBA", "P", "L", "LA", "16-bit"])
def test_a_pngs_top_rows_are_the_whole_decodes_rows(mode):
    img = photo_pixels(240, 330)
    if mode == "16-bit":
        data = cv2_png16(img)
    elif mode == "RGBA":
        data = png(np.dstack([img, np.random.default_rng(1).integers(0, 256, (240, 330), dtype=np.uint8)]), "RGBA")
    else:
        data = png(img, mode)
    info = probe(data)
    assert png_header(data).height == 240
    whole = decode(data, info)
    for rows in (1, 100, 200):
        top = decode_top(data, info, rows)
        assert top is not None and np.array_equal(top, whole[:rows]), rows
    assert decode_top(data, info, 239) is None
    assert png_header(data[:28] + b"\x01" + data[29:]) is None  # Adam7 interlacing: rows come in seven passes


def cv2_png16(img: np.ndarray) -> bytes:
    import cv2

    wide = img.astype(np.uint16) * 257 + np.random.default_rng(2).integers(0, 256, img.shape, dtype=np.uint16)
    return cv2.imencode(".png", np.ascontiguousarray(wide[:, :, ::-1]))[1].tobytes()


@pytest.mark.parametrize("orientation", range(1, 9))
def test_the_top_rows_of_a_turned_photo_become_the_band_top_band_says(big, orientation):
    data = with_orientation(big, orientation)
    info = probe(data)
    stored, whole = decode(data, info, upright=False), decode(data, info)
    assert np.array_equal(apply_orientation(stored, orientation), whole)
    top = decode_top(data, info, 100)
    assert top is not None and np.array_equal(top, stored[:100])
    (r0, r1), (c0, c1) = top_band(orientation, 100, whole.shape[:2])
    assert np.array_equal(apply_orientation(top, orientation), whole[r0:r1, c0:c1])


@pytest.mark.parametrize("orientation", range(1, 9))
def test_a_window_of_the_upright_image_is_cut_from_the_files_pixels(orientation):
    stored = np.random.default_rng(orientation).integers(0, 256, (30, 50, 3), dtype=np.uint8)
    whole = apply_orientation(stored, orientation)
    for rows, cols in [((0, 5), (0, 7)), ((3, 11), (20, whole.shape[1])), ((whole.shape[0] - 1, whole.shape[0]), (1, 2))]:
        window = upright_window(stored, orientation, whole.shape[:2], rows, cols)
        assert np.array_equal(window, whole[rows[0]:rows[1], cols[0]:cols[1]]), (rows, cols)


def test_only_baseline_jpegs_and_pngs_have_an_early_decode(big):
    img = photo_pixels(200, 300)
    progressive = jpeg(img, progressive=True)
    webp = io.BytesIO()
    Image.fromarray(img).save(webp, "WEBP")
    cmyk = io.BytesIO()
    Image.fromarray(img).convert("CMYK").save(cmyk, "JPEG")
    assert jpeg_frame(progressive) is None and decode_top(progressive, probe(progressive), 50) is None
    assert jpeg_frame(png(img)) is None and decode_top(webp.getvalue(), probe(webp.getvalue()), 50) is None
    assert decode_top(cmyk.getvalue(), probe(cmyk.getvalue()), 50) is None  # CMYK: Pillow's own decode only
    for broken in (b"", b"\xff\xd8", b"\xff\xd8\xff", b"\xff\xd8\x00\x00\x00\x00", big[:20], b"\xff\xd8\xff\xda\x00\x02"):
        assert jpeg_frame(broken) is None


def test_a_file_cut_short_gives_no_early_rows_but_its_top_is_still_right_when_present(big):
    info = probe(big)
    assert decode_top(big[: len(big) // 10], info, 600) is None  # the data for 600 rows is not there
    top = decode_top(big[: len(big) * 3 // 4], info, 300)  # the data for 300 rows is
    assert top is not None and np.array_equal(top, decode(big, info)[:300])


# orientation -> (upright grid, the places cut early: the grid line the file's first rows become)
EARLY_PLACES = {1: ((3, 4), [0, 1, 2, 3]), 2: ((3, 4), [0, 1, 2, 3]), 3: ((3, 4), [8, 9, 10, 11]),
                4: ((3, 4), [8, 9, 10, 11]), 5: ((4, 3), [0, 3, 6, 9]), 6: ((4, 3), [2, 5, 8, 11]),
                7: ((4, 3), [2, 5, 8, 11]), 8: ((4, 3), [0, 3, 6, 9])}


@pytest.mark.parametrize("orientation", range(1, 9))
def test_the_stream_cuts_the_same_tiles_from_the_early_rows(big, early_for_small_images, orientation):
    data = big if orientation == 1 else with_orientation(big, orientation)
    decoding = start_decode(data, SETTINGS)
    assert decoding.top is not None and decoding.top_region is not None
    places, tiles = zip(*stream_tiles(decoding))
    expected, plan = serial_tiles(data)
    grid, early = EARLY_PLACES[orientation]
    assert (plan.rows, plan.cols) == grid
    assert list(places) == early + [p for p in range(12) if p not in early] + [12]  # each place once
    for place, tile in zip(places, tiles):
        assert np.array_equal(tile, expected[place]), place
    assert decoding.decoded_at is not None and decoding.decoded_at >= decoding.started
    assert np.array_equal(split_bytes(data, SETTINGS).tiles, np.stack(expected))


def test_early_rows_that_differ_from_the_whole_decode_are_cut_again(big, early_for_small_images, monkeypatch):
    real = tiles_module.decode_top
    monkeypatch.setattr(tiles_module, "decode_top", lambda *args: 255 - real(*args))  # wrong rows
    places, tiles = zip(*stream_tiles(start_decode(big, SETTINGS)))
    assert list(places) == [0, 1, 2, 3] + list(range(13))  # the first row twice, the later ones right
    expected, _ = serial_tiles(big)
    assert not np.array_equal(tiles[0], expected[0])
    final = {place: tile for place, tile in zip(places, tiles)}
    assert all(np.array_equal(final[p], expected[p]) for p in range(13))
    assert np.array_equal(split_bytes(big, SETTINGS).tiles, np.stack(expected))


def test_no_early_decode_where_it_does_not_pay(big, early_for_small_images, monkeypatch):
    webp = io.BytesIO()
    Image.open(io.BytesIO(big)).save(webp, "WEBP")
    assert start_decode(webp.getvalue(), SETTINGS).top is None  # WebP: no early decode
    assert start_decode(png(photo_pixels(1200, 1600)), SETTINGS).top is not None  # a PNG has one
    with monkeypatch.context() as reduced:
        reduced.setattr(tiles_module, "jpeg_reduction", lambda *args: 2)
        assert start_decode(big, SETTINGS).top is None  # decoded reduced: the whole decode is short
    assert start_decode(big, SplitSettings(longest_edge=512, tile=512)).top is None  # one tile: no first row
    monkeypatch.setattr(tiles_module, "frontend_threads", lambda: 1)
    assert start_decode(big, SETTINGS).top is None  # one thread: nothing to run it on
    monkeypatch.undo()
    assert start_decode(jpeg(photo_pixels(600, 800)), SETTINGS).top is None  # 0.5 MP: below the size where it pays


def test_a_failed_early_decode_falls_back_to_the_whole_image(big, early_for_small_images, monkeypatch):
    monkeypatch.setattr(tiles_module, "decode_top", lambda *args: None)
    places = [place for place, _ in stream_tiles(start_decode(big, SETTINGS))]
    assert places == list(range(13))


@pytest.mark.parametrize("reduce", [1, 2])
@pytest.mark.parametrize("orientation", [1, 3, 6, 8])
def test_turning_each_tiles_window_gives_the_tiles_of_the_turned_image(big, monkeypatch, orientation, reduce):
    """Without an early decode too, and from a reduced JPEG decode: the file's pixels are never turned
    whole, and the tiles are those of the upright image."""
    monkeypatch.setattr(tiles_module, "EARLY_DECODE_MIN_PIXELS", 10**12)
    monkeypatch.setattr(tiles_module, "jpeg_reduction", lambda *args: reduce)
    data = with_orientation(big, orientation)
    decoding = start_decode(data, SETTINGS)
    assert decoding.top is None and decoding.orientation == orientation
    places, tiles = zip(*stream_tiles(decoding))
    rgb = decode(data, probe(data), reduce=reduce)
    assert decoding.decoded_hw == rgb.shape[:2]
    expected = list(cut_tiles(rgb, decoding.plan, decoding.settings))
    assert list(places) == list(range(13))
    assert all(np.array_equal(tile, want) for tile, want in zip(tiles, expected))


def test_a_decode_of_another_size_than_the_header_said_is_refused(big, monkeypatch):
    from board.errors import ImageError

    monkeypatch.setattr(tiles_module, "decode", lambda *args, **kwargs: np.zeros((10, 10, 3), np.uint8))
    with pytest.raises(ImageError, match="decoded to 10x10, not the 1600x1200"):
        list(stream_tiles(start_decode(big, SETTINGS)))


def test_a_file_cut_short_after_its_early_rows_is_refused_once_the_whole_decode_fails(big):
    """The early rows decode (the data for them is there); the whole decode then fails and says why."""
    from board.errors import ImageError

    short = big[: len(big) * 3 // 4]
    decoding = start_decode(short, SETTINGS)
    assert decoding.top is not None and decoding.top.result() is not None
    with pytest.raises(ImageError, match="corrupt or truncated"):
        list(stream_tiles(decoding))
