"""Stage 4: image tiles -> the vision rows that replace the `<image>` tokens.

One small interface, `VisionEncoder.encode(tiles)`: uint8 NHWC RGB tiles [n, T, T, 3] in, float32
[n, tokens_per_tile, hidden] out; or `start()`, a job the front end adds tiles to as it cuts them
(the encoder's workers run them in the background, in order). Two backends:

- `RKNNVisionEncoder` (the board): `vision.rknn` on rknnlite. The model is static batch 1 (a
  dynamic-batch build is 3.5x larger and ran out of memory), so speed comes from running tiles on
  the three NPU cores at once: `cores="parallel"` opens one runtime per core and runs the tiles on
  three worker threads (rknnlite's inference is reported to release the GIL while the NPU works:
  three contexts on an RK3588 ran 2.5x faster from three threads, suharvest/rkvoice-stream#5; so the
  front end runs meanwhile; not measured here without a board); `"single"` (core 0) and `"all"`
  (one runtime on NPU_CORE_0_1_2, which splits each layer over the cores) are there so the fastest
  can be measured on a board.
- `OnnxVisionEncoder` (x86 emulation): `host/vision.onnx` on ONNX Runtime, fed what the RKNN model
  computes from the same uint8 tile (for `conv`, the normalization the RKNN build bakes in).

How a tile enters the model is the bundle's vision layout (`vision.layout` in the manifest, resolved
by `tile_feed`; the layouts are defined once, in LAYOUTS): `conv` takes the tile as it is (NHWC uint8
on the NPU, normalized NCHW float in ONNX); `patches<p>` (e.g. `patches16`) takes the tile's p x p
patch rows (`tiles.patchify`), raw values, the normalization being folded into the model's first MatMul.

Which vision file a runtime opens is `vision_model`'s choice: the bundle's main model, or with
`fallback` the opt-in fp16 `conv` model (host.convert --vision-fallback), Rockchip's own input format,
for a board where the patch layout misbehaves. On the board the encoder reads librknnrt's version
report (`sdk_version`) and refuses a runtime older than the rknn-toolkit2 that built the model.

`VisionCache` keeps an image's rows for the session, keyed by a hash of the image bytes and the
tile settings, so a follow-up question about the same picture does not encode it again.
"""

from __future__ import annotations

import hashlib
import logging
import queue
import re
import threading
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import astuple, dataclass
from pathlib import Path
from typing import Any, ClassVar, Mapping, Optional, Union

import numpy as np

from . import bundle_schema as S
from .errors import BundleError, RuntimeUnavailable, VisionError
from .tiles import SplitSettings, TilePlan, normalize_tiles, patch_row_length, patchify

NPU_CORE_MODES = ("parallel", "single", "all")
log = logging.getLogger(__name__)
_RKNNLITE_HINT = "pip install rknn-toolkit-lite2==2.5.0 on the board (aarch64), and put librknnrt.so in /usr/lib"


# -- input layouts: how a tile enters the vision model ------------------------------------------


class TileFeed:
    """One vision input layout: the model input a uint8 NHWC tile becomes, for rknnlite and for ONNX.

    The one definition of each layout, registered in LAYOUTS under its `kind`; host.vision_export's
    export layouts extend these classes (adding the graph's patch embedding and the calibration
    samples) and are registered under the same names. An instance is bound to the model's patch
    size; `name` is the manifest's vision.layout.
    """

    kind: ClassVar[str]  # the registry key (host.convert's --vision-layout choice)
    # True: the patch size is part of the manifest name (`<kind><p>`): the board cannot ask rknnlite
    # for the model's input shape, so it must travel in the manifest
    per_patch: ClassVar[bool] = False
    # True: the model takes normalized pixels (the RKNN build bakes mean/std into its input, the ONNX
    # feed normalizes); False: it starts from raw 0..255 values (the normalization is in its weights)
    rknn_normalizes: ClassVar[bool]
    # rknnlite's data_format for npu_input() ('nhwc': a 4-D image input; None: not an image, none passed)
    npu_data_format: ClassVar[Optional[str]]

    def __init__(self, patch: Optional[int] = None):
        self.patch = patch

    @property
    def name(self) -> str:
        """The manifest's vision.layout, the key tile_feed resolves."""
        return f"{self.kind}{self.patch}" if self.per_patch else self.kind

    def input_shape(self, tile: int) -> tuple[int, ...]:
        """The model's (ONNX graph's) input shape for one tile of `tile` x `tile` pixels."""
        raise NotImplementedError

    def npu_input(self, tile: np.ndarray) -> np.ndarray:
        """What rknnlite is fed for one uint8 NHWC tile [T, T, 3]."""
        raise NotImplementedError

    def onnx_input(self, tiles: np.ndarray, settings: SplitSettings) -> np.ndarray:
        """The float32 ONNX input for uint8 NHWC tiles [n, T, T, 3]: what the RKNN model makes of npu_input."""
        raise NotImplementedError


class ConvFeed(TileFeed):
    """transformers' layout: the tile's pixels into the patch Conv. rknnlite gets the uint8 NHWC tile
    (the build baked the normalization in), ONNX the normalized NCHW tile (tiles.normalize_tiles)."""

    kind = "conv"
    rknn_normalizes = True
    npu_data_format = "nhwc"

    def input_shape(self, tile: int) -> tuple[int, ...]:
        return (1, 3, tile, tile)

    def npu_input(self, tile: np.ndarray) -> np.ndarray:
        return np.ascontiguousarray(tile[None])

    def onnx_input(self, tiles: np.ndarray, settings: SplitSettings) -> np.ndarray:
        return normalize_tiles(tiles, settings)


class PatchFeed(TileFeed):
    """The tile as its patch rows: uint8 [1, (T/p)^2, row_length] (tiles.patchify) to rknnlite, as float32 to ONNX.

    The RKNN model's input is 3-D, so no data_format is passed (rknnlite applies data_format to 4-D
    inputs only) and the uint8 array goes in as it is: the runtime converts it to the model's input
    type (float16, or int8 with the input's quantization), and nothing is normalized on the way:
    the model's weights carry the normalization.
    """

    kind = "patches"
    per_patch = True
    rknn_normalizes = False
    npu_data_format = None

    def __init__(self, patch: Optional[int] = None):
        if not patch:
            raise ValueError(f"the '{self.kind}' layout needs the model's patch size")
        super().__init__(patch)

    @property
    def row_length(self) -> int:
        """Values per patch row: p*p*3 padded to tiles.PATCH_ROW_ALIGN (768 at p=16, 592 at p=14)."""
        return patch_row_length(self.patch)

    def input_shape(self, tile: int) -> tuple[int, ...]:
        return (1, (tile // self.patch) ** 2, self.row_length)

    def npu_input(self, tile: np.ndarray) -> np.ndarray:
        return patchify(tile[None], self.patch)

    def onnx_input(self, tiles: np.ndarray, settings: SplitSettings) -> np.ndarray:
        return patchify(tiles, self.patch).astype(np.float32)


LAYOUTS: dict[str, type[TileFeed]] = {feed.kind: feed for feed in (ConvFeed, PatchFeed)}
# the layouts whose manifest name is their kind, one instance each; per-patch ones are made by tile_feed
FEEDS: dict[str, TileFeed] = {kind: feed() for kind, feed in LAYOUTS.items() if not feed.per_patch}


def tile_feed(layout: str) -> TileFeed:
    """The feed for the manifest's vision.layout: a FEEDS name, or `<kind><p>` of a per-patch layout."""
    if layout in FEEDS:
        return FEEDS[layout]
    for kind, feed in LAYOUTS.items():
        match = re.fullmatch(re.escape(kind) + "([1-9][0-9]*)", layout) if feed.per_patch else None
        if match:
            return feed(int(match.group(1)))
    known = ", ".join(f"{kind}<p>" if feed.per_patch else kind for kind, feed in LAYOUTS.items())
    raise VisionError(
        f"the bundle's vision model takes the '{layout}' input layout, which this runtime does not know "
        f"(it knows: {known})",
        hint="update the board code to the version that converted the bundle",
    )


# -- which vision model ---------------------------------------------------------------------------


# What a vision build must reach against full precision (cosine per token), by dtype: host.vision_rknn
# holds its builds to it, and the board doctor expects it where the manifest does not record a threshold.
DEFAULT_MIN_COSINE = {"fp16": 0.999, "int8": 0.99}


@dataclass(frozen=True)
class VisionModel:
    """One of the bundle's vision models: its .rknn, its ONNX twin for emulation, layout and dtype."""

    file: str
    onnx: Optional[str]
    layout: str
    dtype: str
    min_cosine: Optional[float]  # the accuracy threshold its build was held to (None: not recorded)
    fallback: bool = False


def vision_model(section: Mapping[str, Any], fallback: bool = False) -> VisionModel:
    """The manifest's vision section -> the model to open: the main one, or its `conv` fallback."""
    V, F, A = S.Vision, S.VisionFallback, S.VisionAccuracy
    if not fallback:
        accuracy = section.get(V.ACCURACY) or {}
        return VisionModel(section[V.FILE], section.get(V.ONNX), section.get(V.LAYOUT, "conv"), section[V.DTYPE],
                           accuracy.get(A.THRESHOLD))
    spare = section.get(V.FALLBACK)
    if not spare:
        raise BundleError("this bundle has no fallback vision model",
                          hint="convert it again with `python -m host.convert ... --vision-fallback`")
    accuracy = spare.get(F.ACCURACY) or {}
    return VisionModel(spare[F.FILE], spare.get(F.ONNX), spare[F.LAYOUT], spare[F.DTYPE], accuracy.get(A.THRESHOLD),
                       fallback=True)


def rknnrt_version(sdk_text: str) -> Optional[tuple[int, int, int]]:
    """librknnrt's version from RKNNLite.get_sdk_version()'s report (the `rknnrt` / `DRV` entry)."""
    for label in ("rknnrt", "DRV"):  # 'DRV: rknn_server: x, rknnrt: y' names the server first
        match = re.search(label + r"\D*?(\d+)\.(\d+)\.(\d+)", sdk_text, re.IGNORECASE)
        if match:
            return int(match[1]), int(match[2]), int(match[3])
    return None


def check_rknn_runtime(sdk_text: Optional[str], built_with: Optional[str]) -> Optional[str]:
    """Refuse a librknnrt older than the rknn-toolkit2 that built the model; return a notice when the
    versions cannot be compared (None when they were and agree)."""
    have = rknnrt_version(sdk_text or "")
    want = re.match(r"(\d+)\.(\d+)\.(\d+)", built_with or "")
    if have is None or want is None:
        return f"cannot compare librknnrt ({sdk_text!r}) with the model's rknn-toolkit2 ({built_with!r})"
    need = tuple(int(x) for x in want.groups())
    if have < need:
        raise RuntimeUnavailable(
            f"librknnrt {'.'.join(map(str, have))} is older than rknn-toolkit2 {built_with}, which built the vision model",
            hint=f"install librknnrt.so {built_with} or newer in /usr/lib (airockchip/rknn-toolkit2, "
            "rknpu2/runtime/Linux/librknn_api/aarch64/librknnrt.so)",
        )
    return None


# -- encoders ---------------------------------------------------------------------------------


class VisionEncoder:
    """Tiles in, rows out, encoded in the background in the order given.

    `start()` opens an EncodeJob to which the front end adds tiles as it cuts them, so the NPU works on
    the first tiles (and images) while the rest are still being cut; `encode(tiles)` is one job, waited
    for. The tiles run on `workers` threads (one per NPU runtime); subclasses implement `encode_one`.
    """

    backend = "?"

    def __init__(self, *, tile: int, tokens_per_tile: int, hidden_size: int, feed: TileFeed, workers: int = 1):
        self.tile = tile
        self.tokens_per_tile = tokens_per_tile
        self.hidden_size = hidden_size
        self.feed = feed
        self.workers = workers
        self._pool: Optional[ThreadPoolExecutor] = ThreadPoolExecutor(max_workers=workers,
                                                                      thread_name_prefix=f"vision-{self.backend}")

    def start(self) -> "EncodeJob":
        """A new job: add tiles to it as they are ready, then wait for its rows."""
        return EncodeJob(self)

    def encode(self, tiles: np.ndarray) -> np.ndarray:
        """uint8 [n, T, T, 3] RGB tiles -> float32 [n, tokens_per_tile, hidden]."""
        job = self.start()
        job.add(tiles)
        return job.result()

    def encode_one(self, tile: np.ndarray) -> np.ndarray:
        """One uint8 [T, T, 3] tile -> its float32 rows [tokens_per_tile, hidden], on the calling thread."""
        raise NotImplementedError

    def _checked(self, tiles: Any) -> np.ndarray:
        tiles = np.asarray(tiles)
        if tiles.ndim != 4 or tiles.shape[1:] != (self.tile, self.tile, 3) or tiles.dtype != np.uint8:
            raise VisionError(f"tiles must be uint8 [n, {self.tile}, {self.tile}, 3], got {tiles.dtype} {list(tiles.shape)}")
        return tiles

    def _submit(self, tile: np.ndarray) -> "Future[np.ndarray]":
        pool = self._pool
        try:
            if pool is None:
                raise RuntimeError
            return pool.submit(self.encode_one, tile)
        except RuntimeError:  # the pool was shut down
            raise VisionError("the vision encoder is closed") from None

    def _as_rows(self, output: Any) -> np.ndarray:
        out = np.asarray(output, dtype=np.float32)
        if out.size != self.tokens_per_tile * self.hidden_size:
            raise VisionError(
                f"the vision model returned {list(out.shape)} for one tile; expected [1, {self.tokens_per_tile}, "
                f"{self.hidden_size}]",
                hint="the vision model does not match the bundle's manifest; rebuild the bundle",
            )
        return out.reshape(self.tokens_per_tile, self.hidden_size)

    def close(self) -> None:
        """Stop the workers (tiles not started are dropped) and release the runtime(s); safe to call twice."""
        pool, self._pool = getattr(self, "_pool", None), None
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)

    def __enter__(self) -> "VisionEncoder":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


class EncodeJob:
    """Tiles on their way through a VisionEncoder: `add` queues them (checked first), `result` waits for
    their rows in the order added. If a tile fails, or the wait is interrupted, the tiles not started
    yet are dropped and the error is raised."""

    def __init__(self, encoder: VisionEncoder):
        self._encoder = encoder
        self._futures: list["Future[np.ndarray]"] = []

    def __len__(self) -> int:
        return len(self._futures)

    def add(self, tiles: np.ndarray) -> None:
        """Queue uint8 [n, T, T, 3] tiles after those already added."""
        for tile in self._encoder._checked(tiles):
            self._futures.append(self._encoder._submit(tile))

    def result(self) -> np.ndarray:
        """Wait for every tile: float32 [n, tokens_per_tile, hidden]."""
        enc = self._encoder
        rows = np.empty((len(self._futures), enc.tokens_per_tile, enc.hidden_size), np.float32)
        try:
            for i, future in enumerate(self._futures):
                rows[i] = future.result()
        except BaseException:
            self.cancel()
            raise
        return rows

    def cancel(self) -> None:
        """Drop the tiles that have not started (a started tile finishes: the NPU cannot be interrupted)."""
        for future in self._futures:
            future.cancel()


class OnnxVisionEncoder(VisionEncoder):
    """x86 emulation: the bundle's host/vision.onnx on ONNX Runtime (CPU), one tile per run like the NPU
    (on one worker: ONNX Runtime spreads each run over the CPU cores itself)."""

    backend = "onnxruntime"

    def __init__(self, onnx_path: Union[str, Path], *, settings: SplitSettings, tokens_per_tile: int,
                 hidden_size: int, layout: str = "conv"):
        self._session = None
        super().__init__(tile=settings.tile, tokens_per_tile=tokens_per_tile, hidden_size=hidden_size,
                         feed=tile_feed(layout))
        try:
            import onnxruntime as ort
        except ImportError as exc:
            raise RuntimeUnavailable("--emulate needs onnxruntime", hint="pip install onnxruntime") from exc
        self.settings = settings
        options = ort.SessionOptions()
        options.log_severity_level = 3
        try:
            self._session = ort.InferenceSession(str(onnx_path), options, providers=["CPUExecutionProvider"])
        except Exception as exc:  # onnxruntime raises its own unimportable exception types
            raise VisionError(f"ONNX Runtime cannot load {onnx_path}: {exc}") from exc
        self._input = self._session.get_inputs()[0].name

    def encode_one(self, tile: np.ndarray) -> np.ndarray:
        session = self._session
        if session is None:
            raise VisionError("the vision encoder is closed")
        try:
            output = session.run(None, {self._input: self.feed.onnx_input(tile[None], self.settings)})[0]
        except Exception as exc:  # onnxruntime raises its own unimportable exception types
            raise VisionError(f"ONNX Runtime failed on a tile: {exc}") from exc
        return self._as_rows(output)

    def close(self) -> None:
        super().close()
        self._session = None


class RKNNVisionEncoder(VisionEncoder):
    """The board: vision.rknn on rknnlite, one runtime per NPU core ('parallel'), core 0 ('single'),
    or one runtime over all three cores ('all').

    In 'parallel' each runtime holds its own copy of the weights (3x the model's size in memory):
    rknnlite has no way to share them between contexts.
    """

    backend = "rknnlite"

    def __init__(self, rknn_path: Union[str, Path], *, tile: int, tokens_per_tile: int, hidden_size: int,
                 layout: str = "conv", cores: str = "parallel", built_with: Optional[str] = None):
        self._runtimes: list[Any] = []  # first, so close()/__del__ work after any failure below
        self.sdk_version: Optional[str] = None  # librknnrt's own report, read after the first init
        self.notices: list[str] = []
        self._lock = threading.Lock()
        if cores not in NPU_CORE_MODES:
            raise VisionError(f"unknown NPU core mode '{cores}' (choose from {', '.join(NPU_CORE_MODES)})")
        try:
            from rknnlite.api import RKNNLite
        except ImportError as exc:
            raise RuntimeUnavailable(f"rknnlite (rknn-toolkit-lite2) cannot be imported: {exc}", hint=_RKNNLITE_HINT) from exc
        masks = {
            "parallel": [RKNNLite.NPU_CORE_0, RKNNLite.NPU_CORE_1, RKNNLite.NPU_CORE_2],
            "single": [RKNNLite.NPU_CORE_0],
            "all": [RKNNLite.NPU_CORE_0_1_2],
        }[cores]
        super().__init__(tile=tile, tokens_per_tile=tokens_per_tile, hidden_size=hidden_size, feed=tile_feed(layout),
                         workers=len(masks))
        self.cores = cores
        self._idle: "queue.SimpleQueue[Any]" = queue.SimpleQueue()
        try:
            for i, mask in enumerate(masks):
                runtime = RKNNLite(verbose=False)
                self._runtimes.append(runtime)
                if runtime.load_rknn(str(rknn_path)) != 0:
                    raise VisionError(f"rknnlite could not load {rknn_path}",
                                      hint="copy the bundle again; it must be built by rknn-toolkit2 2.5.0 for rk3588")
                if runtime.init_runtime(core_mask=mask) != 0:
                    raise VisionError(
                        f"rknnlite could not start the vision model on NPU core mask {mask} (runtime {i + 1}/{len(masks)})",
                        hint="check librknnrt.so in /usr/lib (2.5.0), the NPU driver, free memory, "
                        "or try --npu-cores single",
                    )
                if i == 0:
                    self._check_runtime(runtime, built_with)
                self._idle.put(runtime)
        except BaseException:
            self.close()
            raise

    def _check_runtime(self, runtime: Any, built_with: Optional[str]) -> None:
        report = getattr(runtime, "get_sdk_version", None)
        self.sdk_version = " ".join(str(report()).split()) if report else None
        log.info("rknn-toolkit-lite2 / librknnrt: %s (vision model built by rknn-toolkit2 %s)", self.sdk_version,
                 built_with)
        notice = check_rknn_runtime(self.sdk_version, built_with)
        if notice:
            self.notices.append(notice)
            log.warning(notice)

    def encode_one(self, tile: np.ndarray) -> np.ndarray:
        if not self._runtimes:
            raise VisionError("the vision encoder is closed")
        runtime = self._idle.get()  # as many workers as runtimes: one is always free
        try:
            kwargs = {"data_format": [self.feed.npu_data_format]} if self.feed.npu_data_format else {}
            outputs = runtime.inference(inputs=[self.feed.npu_input(tile)], **kwargs)
        finally:
            self._idle.put(runtime)
        if outputs is None or not len(outputs):
            raise VisionError("rknnlite inference failed on a tile (no output)")
        return self._as_rows(outputs[0])

    def close(self) -> None:
        super().close()  # the workers first: no tile is running when the runtimes go
        with self._lock:
            runtimes, self._runtimes = self._runtimes, []
        for runtime in runtimes:
            try:
                runtime.release()
            except Exception:  # noqa: BLE001 - releasing the others matters more than one failure
                pass

    def __del__(self) -> None:
        self.close()


# -- the per-session cache ------------------------------------------------------------------


@dataclass
class EncodedImage:
    """One image's trip through the vision stage: its tile plan and its rows [n_tiles, N, hidden]."""

    plan: TilePlan
    rows: np.ndarray
    cached: bool = False


def image_key(data: Union[bytes, memoryview, np.ndarray], settings: SplitSettings, extra: str = "") -> str:
    """Content hash of the image (file bytes, or pixels + shape) and everything that shapes its tiles."""
    digest = hashlib.sha256()
    if isinstance(data, np.ndarray):
        digest.update(repr((data.shape, str(data.dtype))).encode())
        digest.update(np.ascontiguousarray(data).data)
    else:
        digest.update(data)
    digest.update(repr(astuple(settings)).encode())
    digest.update(extra.encode())
    return digest.hexdigest()


class VisionCache:
    """Least-recently-used rows of the session's images, bounded in bytes (rows are 2.5 MB per 17-tile
    image for the 256M model, 11 MB for 2.2B)."""

    def __init__(self, max_bytes: int = 256 << 20):
        self.max_bytes = max_bytes
        self._entries: "OrderedDict[str, EncodedImage]" = OrderedDict()
        self._bytes = 0

    def get(self, key: str) -> Optional[EncodedImage]:
        entry = self._entries.get(key)
        if entry is None:
            return None
        self._entries.move_to_end(key)
        return EncodedImage(entry.plan, entry.rows, cached=True)

    def put(self, key: str, image: EncodedImage) -> None:
        if image.rows.nbytes > self.max_bytes:
            return
        if key in self._entries:
            self._bytes -= self._entries.pop(key).rows.nbytes
        image.rows.setflags(write=False)  # shared by every later hit
        self._entries[key] = EncodedImage(image.plan, image.rows)
        self._bytes += image.rows.nbytes
        while self._bytes > self.max_bytes:
            _, old = self._entries.popitem(last=False)
            self._bytes -= old.rows.nbytes

    def clear(self) -> None:
        self._entries.clear()
        self._bytes = 0

    def __len__(self) -> int:
        return len(self._entries)
