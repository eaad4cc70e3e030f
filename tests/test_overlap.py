"""The front end overlapped with the vision encoder: the same rows, in the same order, as encoding each
image's tiles one after the other; the encoder starts before the last tile is cut; failures drop the
tiles not started. The encoder here is a test double whose rows are a function of the tile's pixels
and which takes a few milliseconds per tile on three workers, like the NPU's three cores."""

from __future__ import annotations

import random
import threading
import time

import numpy as np
import pytest

import board.pipeline as pipeline_module
from board.errors import ImageError, VisionError
from board.image_io import load_image
from board.pipeline import Pipeline
from board.tiles import budget_settings, split_image
from board.vision import FEEDS, VisionEncoder

N, H = 4, 8  # rows per tile, hidden size of the double


def rows_of(tile: np.ndarray) -> np.ndarray:
    """[N, H] rows that differ for every tile: means of 32 horizontal bands."""
    return tile.reshape(N * H, -1).mean(axis=1, dtype=np.float64).astype(np.float32).reshape(N, H)


class SlowEncoder(VisionEncoder):
    """Rows from the pixels, 0-`delay` s per tile (random, so tiles finish out of order), 3 workers."""

    backend = "test-double"

    def __init__(self, tile: int, delay: float = 0.02, fail_on: int | None = None):
        super().__init__(tile=tile, tokens_per_tile=N, hidden_size=H, feed=FEEDS["conv"], workers=3)
        self.delay, self.fail_on = delay, fail_on
        self.started: list[float] = []
        self._lock = threading.Lock()
        self._random = random.Random(0)

    def encode_one(self, tile: np.ndarray) -> np.ndarray:
        with self._lock:
            index = len(self.started)
            self.started.append(time.perf_counter())
            pause = self._random.uniform(0, self.delay)
        time.sleep(pause)
        if index == self.fail_on:
            raise VisionError("the double fails on purpose")
        return rows_of(tile)


class NoDecoder:
    def close(self) -> None:
        pass


def test_a_job_fed_in_pieces_gives_the_serial_rows_in_order():
    tiles = np.random.default_rng(0).integers(0, 256, (11, 64, 64, 3), dtype=np.uint8)
    with SlowEncoder(64) as encoder:
        job = encoder.start()
        for part in (tiles[:1], tiles[1:5], tiles[5:6], tiles[6:]):
            job.add(part)
        assert len(job) == 11
        assert np.array_equal(job.result(), np.stack([rows_of(t) for t in tiles]))
        assert np.array_equal(encoder.encode(tiles[:0]), np.zeros((0, N, H), np.float32))


def test_a_failed_tile_raises_and_drops_the_tiles_not_started():
    tiles = np.zeros((30, 64, 64, 3), np.uint8)
    encoder = SlowEncoder(64, delay=0.05, fail_on=1)
    with pytest.raises(VisionError, match="on purpose"):
        encoder.encode(tiles)
    encoder.close()  # waits for the tiles still running
    assert len(encoder.started) < 30
    with pytest.raises(VisionError, match="closed"):
        encoder.start().add(tiles[:1])


@pytest.fixture
def overlapped(bundle):
    encoder = SlowEncoder(512)
    with Pipeline(bundle, emulate=True, vision=encoder, decoder=NoDecoder()) as pipeline:
        yield pipeline, encoder


def test_overlapped_encoding_equals_serial_encoding(overlapped, images, monkeypatch):
    pipeline, encoder = overlapped
    pipeline.encode_image(images["tall"], pipeline.begin_turn().timings)  # now in the session cache
    cut_at: list[float] = []
    real_stream = pipeline_module.stream_tiles

    def recording_stream(*args, **kwargs):
        for place_and_tile in real_stream(*args, **kwargs):
            yield place_and_tile
            cut_at.append(time.perf_counter())

    monkeypatch.setattr(pipeline_module, "stream_tiles", recording_stream)
    pixels = load_image(images["small"])[::2, ::3].copy()
    sources = [images["wide"], images["tall"], images["wide"], pixels, images["small"]]
    timings = pipeline.begin_turn().timings
    items, encoded = pipeline.encode_media(sources, None, timings, max_tiles=None)

    assert items == [{"type": "image"}] * 5
    for source, image in zip(sources, encoded):
        rgb = source if isinstance(source, np.ndarray) else load_image(source)
        settings = budget_settings(pipeline.settings, rgb.shape[0], rgb.shape[1], None)
        tiled = split_image(rgb, settings)
        assert image.plan == tiled.plan
        assert np.array_equal(image.rows, np.stack([rows_of(t) for t in tiled.tiles]))
    assert [e.cached for e in encoded] == [False, True, True, False, False]  # tall: cache; wide again: this turn
    assert (timings.images, timings.images_cached) == (5, 2)
    assert timings.vision_tiles == sum(e.plan.n_tiles for e in encoded if not e.cached) == len(cut_at)
    assert timings.tiles == sum(e.plan.n_tiles for e in encoded)
    assert encoder.started[-len(cut_at)] < cut_at[-1]  # the encoder ran while tiles were still being cut
    assert timings.image_encode_ms == pytest.approx(timings.image_decode_ms + timings.tiles_ms + timings.vision_ms)
    assert 0 < timings.vision_ms <= timings.npu_ms


def test_a_bad_image_drops_the_earlier_images_tiles(overlapped, images):
    pipeline, encoder = overlapped
    encoder.delay = 0.3  # slower than the front end: most tiles are still queued when the error comes
    before = len(encoder.started)
    with pytest.raises(ImageError):
        pipeline.encode_media([images["wide"], b"not an image"], None, pipeline.begin_turn().timings)
    time.sleep(0.2)  # what had started finishes; nothing else may start
    assert len(encoder.started) - before < 13
    later = pipeline.encode_image(images["small"], pipeline.begin_turn().timings)  # the encoder still works
    assert later.rows.shape == (later.plan.n_tiles, N, H)


@pytest.mark.parametrize("early_rows_right", [True, False])
def test_tiles_cut_from_a_jpegs_early_rows_give_the_serial_rows(overlapped, monkeypatch, early_rows_right):
    """The first tile row comes from an early decode of the JPEG's top; when those rows turn out
    different from the whole decode, the row is cut and encoded again and the image gets the new rows."""
    import io

    import board.tiles as tiles_module
    from PIL import Image

    pipeline, encoder = overlapped
    monkeypatch.setattr(tiles_module, "EARLY_DECODE_MIN_PIXELS", 0)
    if not early_rows_right:
        real = tiles_module.decode_top
        monkeypatch.setattr(tiles_module, "decode_top", lambda *args: 255 - real(*args))
    out = io.BytesIO()
    Image.fromarray(np.random.default_rng(5).integers(0, 256, (1200, 1600, 3), dtype=np.uint8)).save(out, "JPEG")
    data = out.getvalue()
    before = len(encoder.started)
    timings = pipeline.begin_turn().timings
    image = pipeline.encode_image(data, timings)
    rgb = load_image(data)
    tiled = split_image(rgb, budget_settings(pipeline.settings, *rgb.shape[:2], None))
    assert (image.plan.rows, image.plan.cols) == (3, 4)
    assert np.array_equal(image.rows, np.stack([rows_of(t) for t in tiled.tiles]))
    assert len(encoder.started) - before == 13 + (0 if early_rows_right else 4)
    assert timings.image_encode_ms == pytest.approx(timings.image_decode_ms + timings.tiles_ms + timings.vision_ms)
