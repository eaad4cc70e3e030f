"""SmolVLM2 video: frame sampling and prompt layout against the reference code, and video end to end in emulation.

The reference SmolVLMProcessor cannot be built here (its video processor needs torchvision, which has
no CPU build reachable from this machine), so the layout is checked against the strings the
reference's own functions produce: `SmolVLMVideoProcessor.sample_frames` (pure numpy) and
`SmolVLMProcessor.replace_video_token` called on a stand-in processor, with the chat template the
reference switches to for videos. Frame pixels cannot be compared (the reference resizes with
torchvision); the end-to-end test therefore feeds the reference model the board's frame tiles and
checks that everything after the pixels (placement, prompt, sequence, decoding) gives the same tokens.
"""

from __future__ import annotations

from types import SimpleNamespace

import cv2
import numpy as np
import pytest

from board.errors import BundleError, InputError
from board.prompt import build_prompt
from board.tiles import SplitSettings, normalize_tiles
from board.video import (
    SampledVideo, VideoSettings, frame_plan, frame_tile, number_words, read_video, sample_frame_indices, video_items,
)


smolvlm = pytest.importorskip("transformers.models.smolvlm.processing_smolvlm")
video_processing = pytest.importorskip("transformers.models.smolvlm.video_processing_smolvlm")


def video_section(fps=1, max_frames=64, longest_edge=512):
    """The manifest section host.convert writes: the checkpoint's video_sampling + the reference's strings."""
    return {"fps": fps, "max_frames": max_frames, "video_size": {"longest_edge": longest_edge}, "skip_secs": 1,
            "intro": smolvlm.DEFAULT_VIDEO_INTRO, "frame_timestamp": smolvlm.FRAME_TIMESTAMP_MESSAGE,
            "outro": smolvlm.DEFAULT_MEDIA_OUTTRO}


def write_video(path, frames=30, fps=10.0, size=(96, 64)):
    """An MJPG video whose frame i is a flat grey of level 8 * i."""
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), fps, size)
    assert writer.isOpened()
    for i in range(frames):
        writer.write(np.full((size[1], size[0], 3), 8 * i, np.uint8))
    writer.release()
    return path


def test_number_words():
    assert [number_words(n) for n in (0, 1, 13, 20, 21, 64, 100, 105, 999)] == [
        "zero", "one", "thirteen", "twenty", "twenty-one", "sixty-four", "one hundred", "one hundred and five",
        "nine hundred and ninety-nine"]
    with pytest.raises(ValueError):
        number_words(1000)
    num2words = pytest.importorskip("num2words").num2words
    assert all(number_words(n) == num2words(n) for n in range(1000))


@pytest.mark.parametrize("fps,max_frames", [(1, 64), (2, 8), (0.5, 3)])
def test_frame_sampling_equals_reference(fps, max_frames):
    from transformers.video_utils import VideoMetadata

    reference = video_processing.SmolVLMVideoProcessor(
        video_sampling={"fps": fps, "max_frames": max_frames, "video_size": {"longest_edge": 512}})
    settings = VideoSettings.from_manifest(video_section(fps, max_frames))
    for total in (1, 2, 10, 30, 100, 299, 1800, 7200):
        for video_fps in (1.0, 10.0, 24.0, 25.0, 29.97, 30.0, 60.0):
            meta = VideoMetadata(total_num_frames=total, fps=video_fps, duration=total / video_fps)
            expected = reference.sample_frames(meta)
            assert sample_frame_indices(total, video_fps, settings).tolist() == expected.tolist(), (total, video_fps)


def _reference_video_text(metadata, frame_count, image_seq_len, question):
    """The reference's prompt text for [video, question]: its video chat template, then replace_video_token."""
    from transformers.utils.chat_template_utils import render_jinja_template

    stand_in = SimpleNamespace(image_seq_len=image_seq_len, image_token="<image>",
                               fake_image_token="<fake_token_around_image>", global_image_token="<global-img>")
    expansion = smolvlm.SmolVLMProcessor.replace_video_token(
        stand_in, {"pixel_values": np.zeros((1, frame_count, 3, 1, 1)), "video_metadata": [metadata]}, 0)
    messages = [{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": question}]}]
    rendered, _ = render_jinja_template(conversations=[messages], chat_template=smolvlm.DEFAULT_CHAT_TEMPLATE,
                                        add_generation_prompt=True)
    assert rendered[0].count("<video>") == 1
    return rendered[0].replace("<video>", expansion)


def test_prompt_layout_equals_reference_strings(tiny_checkpoint):
    pytest.importorskip("num2words")
    from transformers.video_utils import VideoMetadata

    from host.checkpoint import load_checkpoint
    from host.prompt_format import prompt_format_from_processor, tokenizer_json
    from tokenizers import Tokenizer

    ck = load_checkpoint(tiny_checkpoint("256m"))
    processor = ck.load_processor()
    fmt = prompt_format_from_processor(processor, ck.chat_template)
    tokenizer = Tokenizer.from_str(tokenizer_json(processor.tokenizer))
    split = SplitSettings.from_preprocessor(ck.preprocessor)
    settings = VideoSettings.from_manifest(video_section())
    for total, video_fps in ((30, 10.0), (2400, 30.0), (95, 25.0)):  # 3 s; 80 s (64 frames, ends skipped); 3.8 s
        indices = sample_frame_indices(total, video_fps, settings).tolist()
        frames = [np.zeros((48, 64, 3), np.uint8)] * len(indices)
        video = SampledVideo(frames, indices, video_fps, total / video_fps)
        items = video_items(video, settings)
        messages = [{"role": "user", "content": items + [{"type": "text", "text": "What happens?"}]}]
        prompt = build_prompt(messages, [frame_plan(f, split) for f in frames], fmt, tokenizer, processor.image_token_id)
        metadata = VideoMetadata(total_num_frames=total, fps=video_fps, duration=total / video_fps, frames_indices=indices)
        text = _reference_video_text(metadata, len(frames), fmt.image_seq_len, "What happens?")
        assert prompt.text == text
        assert prompt.input_ids.tolist() == processor.tokenizer(text)["input_ids"]
        assert len(prompt.image_positions) == len(frames) * fmt.image_seq_len


def test_read_video_samples_and_decodes(tmp_path):
    settings = VideoSettings.from_manifest(video_section())
    video = read_video(write_video(tmp_path / "clip.avi"), settings)
    assert video.indices == [0, 14, 29] and video.duration == pytest.approx(3.0)
    assert [round(t, 2) for t in video.timestamps] == [0.0, 1.4, 2.9]
    levels = [float(f.mean()) for f in video.frames]
    assert levels == pytest.approx([0, 112, 232], abs=4)  # frame i is grey 8*i (MJPG is lossy)
    split = SplitSettings(longest_edge=2048, tile=512)
    tile = frame_tile(video.frames[1], settings, split)
    assert tile.shape == (512, 512, 3) and abs(float(tile.mean()) - levels[1]) < 1


def test_video_errors(tmp_path):
    settings = VideoSettings.from_manifest(video_section())
    with pytest.raises(InputError, match="not found"):
        read_video(tmp_path / "missing.mp4", settings)
    (tmp_path / "bad.mp4").write_bytes(b"not a video")
    with pytest.raises(InputError):
        read_video(tmp_path / "bad.mp4", settings)
    with pytest.raises(InputError, match="does not take video"):
        VideoSettings.from_manifest(None)
    with pytest.raises(BundleError, match=r"manifest\.video\.intro is missing"):
        VideoSettings.from_manifest({k: v for k, v in video_section().items() if k != "intro"})


def test_video_end_to_end_in_emulation(tmp_path, tmp_path_factory, tiny_checkpoint, images):
    pytest.importorskip("num2words")
    pytest.importorskip("onnxruntime")
    import torch
    from transformers.video_utils import VideoMetadata

    from board.pipeline import Pipeline
    from board.decoder import SamplingParams
    from support import Oracle, stopping_video_setup

    variant = stopping_video_setup(tmp_path_factory, tiny_checkpoint, images["wide"])
    clip = write_video(tmp_path / "clip.avi")
    with Pipeline(variant.bundle, emulate=True) as pipeline:
        assert pipeline.bundle.video == {k: v for k, v in video_section().items() if k != "skip_secs"}
        reply = pipeline.ask("What happens?", video=clip, sampling=SamplingParams(max_new_tokens=12))
        answer = reply.collect()
        settings = VideoSettings.from_manifest(pipeline.bundle.video)
        video = read_video(clip, settings)
        tiles = np.stack([frame_tile(f, settings, pipeline.settings) for f in video.frames])
    assert answer.tiles_per_image == [1, 1, 1] and answer.timings.vision_tiles == 3

    oracle = Oracle(variant.checkpoint)
    metadata = VideoMetadata(total_num_frames=30, fps=10.0, duration=3.0, frames_indices=video.indices)
    text = _reference_video_text(metadata, 3, oracle.processor.image_seq_len, "What happens?")
    ids = oracle.processor.tokenizer(text, return_tensors="pt")["input_ids"]
    assert reply.prompt.input_ids.tolist() == ids[0].tolist()
    pixels = torch.from_numpy(normalize_tiles(tiles, pipeline.settings))[None]  # the board's frames (see docstring)
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "pixel_values": pixels}
    assert answer.token_ids == oracle.generate(inputs, 12)
