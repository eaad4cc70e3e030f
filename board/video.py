"""Video for SmolVLM2 bundles: frames sampled from a file with OpenCV, placed the way SmolVLM2 places them.

The reference (transformers' SmolVLMProcessor + SmolVLMVideoProcessor) does:
- sampling (`sample_frames`): round(fps * duration) frames, at most max_frames, evenly spaced from
  the first to the last frame (skipping `skip_secs` at both ends when the video is long enough),
  duplicates dropped;
- pixels: each frame resized so its longest edge is the video size (other side rounded up to even),
  then squashed to one square tile: frames are never split;
- prompt: the video becomes an intro naming the frame count in words and the duration (H:MM:SS),
  then per frame "\\nFrame from MM:SS:" and the frame as an unsplit image, then an outro.

The strings and numbers come from the bundle's manifest video section (board.bundle_schema.Video;
host.convert writes it from the checkpoint's `video_sampling` and the reference processor's
constants); nothing here is typed from the reference. A frame becomes ordinary content items
(text + image placeholders), so the board's prompt renderer and sequence builder handle it like
any image.

Pixel parity is not exact by construction: the reference resizes frames with torchvision (Lanczos
from torchvision 0.27, else bicubic), the board with Pillow's Lanczos as for images.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any, Mapping, Optional, Union

import cv2
import numpy as np

from . import bundle_schema as S
from .errors import BundleError, InputError
from .tiles import MAX_IMAGE_SIDE, SplitSettings, TilePlan, longest_edge_size, resize

_ONES = ("zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen "
         "sixteen seventeen eighteen nineteen").split()
_TENS = "_ _ twenty thirty forty fifty sixty seventy eighty ninety".split()


def number_words(n: int) -> str:
    """English words for 0..999 as num2words writes them ('twenty-one', 'one hundred and five')."""
    if not 0 <= n < 1000:
        raise ValueError(f"number_words covers 0..999, got {n}")
    if n < 20:
        return _ONES[n]
    if n < 100:
        return _TENS[n // 10] + ("-" + _ONES[n % 10] if n % 10 else "")
    rest = n % 100
    return _ONES[n // 100] + " hundred" + (" and " + number_words(rest) if rest else "")


@dataclass(frozen=True)
class VideoSettings:
    """The manifest's "video" section: SmolVLM2's sampling limits and prompt pieces."""

    fps: float
    max_frames: int
    longest_edge: int  # the first resize's target; frames then become one tile
    intro: str  # with {frame_count} and {video_duration}
    frame_timestamp: str  # with {timestamp}
    outro: str
    skip_secs: float = 1.0  # sample_frames' default in the reference

    @classmethod
    def from_manifest(cls, section: Optional[Mapping[str, Any]]) -> "VideoSettings":
        if not section:
            raise InputError("this bundle's model does not take video (only SmolVLM2 models do)",
                             hint="convert a SmolVLM2 checkpoint, or give frames as images")
        V = S.Video
        S.validate(section, V, f"manifest.{S.Manifest.VIDEO}")
        settings = cls(
            fps=float(section[V.FPS]),
            max_frames=section[V.MAX_FRAMES],
            longest_edge=section[V.VIDEO_SIZE][S.VideoSize.LONGEST_EDGE],
            intro=section[V.INTRO],
            frame_timestamp=section[V.FRAME_TIMESTAMP],
            outro=section[V.OUTRO],
            skip_secs=float(section.get(V.SKIP_SECS, 1.0)),
        )
        if settings.fps <= 0 or not 1 <= settings.max_frames < 1000:
            raise BundleError(f"the manifest's video settings are out of range: {settings}", hint=S.REBUILD_HINT)
        return settings


@dataclass
class SampledVideo:
    """Frames taken from a video file (RGB uint8, source size) and where they sit in time."""

    frames: list[np.ndarray]
    indices: list[int]
    video_fps: float
    duration: float  # seconds, total frames / fps as the reference computes it

    @property
    def timestamps(self) -> list[float]:
        return [i / self.video_fps for i in self.indices]


def sample_frame_indices(total_frames: int, video_fps: float, settings: VideoSettings) -> np.ndarray:
    """Which frames to keep: the reference's SmolVLMVideoProcessor.sample_frames."""
    duration = total_frames / video_fps
    wanted = max(1, min(int(round(settings.fps * duration)), settings.max_frames))
    start, end = 0, total_frames - 1
    if settings.skip_secs > 0 and duration - 2 * settings.skip_secs > settings.max_frames * settings.fps:
        start = int(settings.skip_secs * video_fps)
        end = int(total_frames - settings.skip_secs * video_fps)
    start, end = max(0, start), min(end, total_frames - 1)
    if start >= end:
        start, end = 0, total_frames - 1
    return np.unique(np.linspace(start, end, wanted, dtype=int))


def read_video(path: Union[str, Path], settings: VideoSettings) -> SampledVideo:
    """Open a video with OpenCV and decode only the sampled frames (the others are grabbed, not converted)."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise InputError(f"video file not found: {path}")
    capture = cv2.VideoCapture(str(path))
    try:
        if not capture.isOpened():
            raise InputError(f"cannot open {path} as a video (OpenCV could not read its container or codec)")
        total = int(capture.get(cv2.CAP_PROP_FRAME_COUNT))
        fps = float(capture.get(cv2.CAP_PROP_FPS))
        if total <= 0 or fps <= 0:
            raise InputError(f"{path} reports {total} frames at {fps} fps; cannot sample it")
        wanted = sample_frame_indices(total, fps, settings)
        keep = set(int(i) for i in wanted)
        frames, indices = [], []
        for index in range(int(wanted[-1]) + 1):
            if not capture.grab():
                break
            if index in keep:
                ok, bgr = capture.retrieve()
                if ok and bgr is not None:
                    frames.append(cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB))
                    indices.append(index)
        if not frames:
            raise InputError(f"no frame of {path} could be decoded")
        return SampledVideo(frames, indices, fps, total / fps)
    finally:
        capture.release()


def frame_tile(frame: np.ndarray, video: VideoSettings, split: SplitSettings) -> np.ndarray:
    """One frame as one tile: longest edge to the video size, then squashed to the tile (never split);
    resampled like image tiles (float32, within 2 levels of Pillow)."""
    size = longest_edge_size(frame.shape[0], frame.shape[1], min(video.longest_edge, MAX_IMAGE_SIDE))
    return resize(resize(frame, size, split.resample, exact=False), (split.tile, split.tile), split.resample,
                  exact=False)


def frame_plan(frame: np.ndarray, split: SplitSettings) -> TilePlan:
    """The tile plan of an unsplit frame: the prompt shows it as a single global image."""
    return TilePlan(frame.shape[:2], (split.tile, split.tile), (split.tile, split.tile), 0, 0, split.tile)


def video_items(video: SampledVideo, settings: VideoSettings) -> list[dict[str, Any]]:
    """The content items a video stands for: intro, then per frame its timestamp and an image placeholder,
    then the outro (the reference's replace_video_token, as items the prompt renderer expands)."""
    duration = timedelta(seconds=int(video.duration))
    items: list[dict[str, Any]] = [{"type": "text", "text": settings.intro.format(
        frame_count=number_words(len(video.frames)), video_duration=str(duration))}]
    for second in video.timestamps:
        stamp = f"{int(second // 60):02d}:{int(second % 60):02d}"
        items.append({"type": "text", "text": settings.frame_timestamp.format(timestamp=stamp)})
        items.append({"type": "image"})
    items.append({"type": "text", "text": settings.outro})
    return items
