"""The board front end against the reference processor (the oracle), for both geometries.

For each image and conversation: input_ids identical, tile grid identical, tiles within
mean |diff| <= 0.01 and max |diff| <= 0.1 on the normalized [-1, 1] scale.
"""

from __future__ import annotations

import io

import cv2
import numpy as np
import pytest
from PIL import Image, ImageOps
from tokenizers import Tokenizer

from board.image_io import load_image
from board.prompt import build_prompt
from board.tiles import SplitSettings, split_image
from host.checkpoint import load_checkpoint
from host.prompt_format import prompt_format_from_processor, tokenizer_json

RNG = np.random.default_rng(3)


def photo(h: int, w: int) -> np.ndarray:
    """Photo-like content: smooth colour fields, texture and noise (resampling errors show on it)."""
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    img = np.stack(
        [128 + 90 * np.sin(x / 41 + y / 97), 128 + 90 * np.cos(y / 29 - x / 300), 128 + 70 * np.sin((x - y) / 17)], -1
    )
    img += RNG.normal(0, 18, img.shape)
    return np.clip(img, 0, 255).astype(np.uint8)


def document(h: int, w: int) -> np.ndarray:
    """A white page with black text: the sharp edges documents have."""
    page = np.full((h, w, 3), 255, np.uint8)
    for i, y in enumerate(range(30, h - 10, max(24, h // 40))):
        cv2.putText(page, f"Line {i}: invoice total 1,234.56 EUR", (10, y), cv2.FONT_HERSHEY_SIMPLEX,
                    max(0.4, w / 1400), (0, 0, 0), 1, cv2.LINE_AA)
    return page


def encode(pixels: np.ndarray, fmt: str = "PNG", mode: str | None = None, **kw) -> bytes:
    im = Image.fromarray(pixels)
    if mode:
        im = im.convert(mode)
    buf = io.BytesIO()
    im.save(buf, fmt, **kw)
    return buf.getvalue()


SIZES = [(1, 1), (8, 8), (37, 53), (512, 512), (384, 384), (480, 640), (1920, 1080), (1080, 1920),
         (3024, 4032), (2, 4000), (4000, 3), (9000, 100), (511, 513), (2049, 2047)]

IMAGE_CASES = {f"photo-{h}x{w}": encode(photo(h, w)) for h, w in SIZES}
IMAGE_CASES.update({
    "document-jpeg": encode(document(1100, 850), "JPEG", quality=92),
    "photo-jpeg-big": encode(photo(3000, 4000), "JPEG", quality=90),
    "photo-rgba": encode(np.dstack([photo(300, 500), RNG.integers(0, 256, (300, 500), dtype=np.uint8)])),
    "photo-palette": encode(photo(400, 300), "PNG", mode="P"),
    "photo-gray": encode(photo(700, 1000), "PNG", mode="L"),
    "photo-webp": encode(photo(720, 1280), "WEBP", quality=85),
})


def reference_image(data: bytes) -> Image.Image:
    return ImageOps.exif_transpose(Image.open(io.BytesIO(data)))


@pytest.fixture(scope="module", params=["256m", "2.2b"])
def setup(request, tiny_checkpoint):
    ck = load_checkpoint(tiny_checkpoint(request.param))
    processor = ck.load_processor()
    fmt = prompt_format_from_processor(processor, ck.chat_template)
    tokenizer = Tokenizer.from_str(tokenizer_json(processor.tokenizer))
    settings = SplitSettings.from_preprocessor(ck.preprocessor)
    return processor, fmt, tokenizer, settings


def _compare_tiles(ours: np.ndarray, ref: np.ndarray) -> None:
    assert ours.shape == ref.shape
    diff = np.abs(ours - ref)
    assert diff.mean() <= 0.01 and diff.max() <= 0.1, (diff.mean(), diff.max())


@pytest.mark.parametrize("name", sorted(IMAGE_CASES))
def test_single_image(setup, name):
    processor, fmt, tokenizer, settings = setup
    data = IMAGE_CASES[name]
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is in this image?"}]}]

    tiled = split_image(load_image(data), settings)
    prompt = build_prompt(messages, [tiled.plan], fmt, tokenizer, processor.image_token_id)

    ref_image = reference_image(data)
    grid = processor.image_processor(ref_image, return_row_col_info=True)
    ref = processor(text=processor.apply_chat_template(messages, add_generation_prompt=True), images=[ref_image])
    assert (tiled.rows, tiled.cols) == (grid["rows"][0][0], grid["cols"][0][0])
    assert prompt.input_ids.tolist() == ref["input_ids"][0]
    _compare_tiles(tiled.normalized(), ref["pixel_values"][0][: tiled.plan.n_tiles])


CONVERSATIONS = {
    "two-images": (
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Compare with"},
                                      {"type": "image"}, {"type": "text", "text": "please."}]}],
        ["photo-480x640", "document-jpeg"],
    ),
    "system-multi-turn": (
        [
            {"role": "system", "content": [{"type": "text", "text": "Answer in one word."}]},
            {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Colour?"}]},
            {"role": "assistant", "content": [{"type": "text", "text": "Blue."}]},
            {"role": "user", "content": [{"type": "text", "text": "And this one?"}, {"type": "image"}]},
        ],
        ["photo-1920x1080", "photo-2x4000"],
    ),
    "no-image": ([{"role": "user", "content": [{"type": "text", "text": "Tell me a joke.\n\nA short one."}]}], []),
    "string-content": ([{"role": "user", "content": "Plain string content"}], []),
}


@pytest.mark.parametrize("name", sorted(CONVERSATIONS))
def test_conversations(setup, name):
    processor, fmt, tokenizer, settings = setup
    messages, image_names = CONVERSATIONS[name]
    tiled = [split_image(load_image(IMAGE_CASES[n]), settings) for n in image_names]
    prompt = build_prompt(messages, [t.plan for t in tiled], fmt, tokenizer, processor.image_token_id)

    ref_messages = [
        {**m, "content": [{"type": "text", "text": m["content"]}] if isinstance(m["content"], str) else m["content"]}
        for m in messages
    ]
    text = processor.apply_chat_template(ref_messages, add_generation_prompt=True)
    images = [reference_image(IMAGE_CASES[n]) for n in image_names] or None
    ref = processor(text=text, images=images)
    assert prompt.input_ids.tolist() == ref["input_ids"][0]
    assert prompt.image_positions.size == sum(t.plan.n_tiles for t in tiled) * fmt.image_seq_len
    if tiled:
        ours = np.concatenate([t.normalized() for t in tiled])
        _compare_tiles(ours, ref["pixel_values"][0][: len(ours)])
