"""Vision tower + connector of a SmolVLM checkpoint, for ONE tile, as an ONNX graph the RKNN compiler takes.

The graph maps one tile to the `<image>` token embeddings it stands for: `[1, N, text_hidden]`, with
N = (tile / patch)^2 / scale^2 (64 for the 512/16 x4 family, 81 for 384/14 x3).

Why a wrapper instead of exporting transformers' module as it is: its patch-position code (fractional
coordinates + `bucketize`, there for padded images) exports an invalid graph. A tile the board sends
is never padded, so the position ids are simply 0..P-1 and the wrapper adds the position-embedding
table directly; the result is bit-identical to the reference (`VisionTower.reference` runs the
unmodified transformers path, and the tests compare the two).

The input side is a pluggable `InputLayout`: how the tile enters the graph (its shape, the patch
embedding that consumes it, what the RKNN build bakes in, what the board feeds). The layout of
transformers and Rockchip's demo is `conv` (an NCHW tile and the 16x16/stride-16 Conv). The encoder,
post-norm, pixel shuffle and projection after the patch embedding are shared by every layout.
"""

from __future__ import annotations

import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from board.tiles import SplitSettings, normalize_tiles

# Opset 17-19: GELU and LayerNorm export as single nodes the compiler fuses; 20 is rejected by it.
DEFAULT_OPSET = 18
INPUT_NAME = "tile"
OUTPUT_NAME = "image_features"


@dataclass(frozen=True)
class VisionGeometry:
    """The shapes that define one tile's trip through the tower, read from the model itself."""

    tile: int
    patch: int
    scale_factor: int
    vision_hidden: int
    text_hidden: int

    @property
    def grid(self) -> int:
        return self.tile // self.patch

    @property
    def n_patches(self) -> int:
        return self.grid**2

    @property
    def tokens_per_tile(self) -> int:
        return self.n_patches // self.scale_factor**2

    @property
    def output_shape(self) -> tuple[int, int, int]:
        return (1, self.tokens_per_tile, self.text_hidden)


class InputLayout:
    """How a tile enters the graph; one subclass per layout, registered in LAYOUTS.

    Everything that depends on the layout lives here, so the export, the RKNN build, the calibration
    set and the accuracy check can never disagree about it.
    """

    name: str
    # True: the graph takes normalized pixels and the RKNN build bakes mean/std in (board feeds uint8).
    # False: the graph itself starts from raw 0..255 values (normalization folded into its weights).
    rknn_normalizes: bool
    # How rknn.inference is told the layout of rknn_input() ('nhwc' for image tiles, None otherwise).
    rknn_data_format: str | None

    def onnx_input_shape(self, geometry: VisionGeometry) -> tuple[int, ...]:
        raise NotImplementedError

    def embed(self, embeddings: Any, x: Any) -> Any:
        """The patch embeddings [1, P, D] before positions, from the graph's input x."""
        raise NotImplementedError

    def onnx_input(self, tiles: np.ndarray, settings: SplitSettings) -> np.ndarray:
        """The float32 graph input for uint8 NHWC tiles [n, T, T, 3] (batch of n, for ONNX Runtime)."""
        raise NotImplementedError

    def rknn_input(self, tile: np.ndarray) -> np.ndarray:
        """What the board hands the NPU for one uint8 NHWC tile [T, T, 3]."""
        raise NotImplementedError

    def calibration_array(self, tile: np.ndarray) -> np.ndarray:
        """One calibration sample for rknn-toolkit2's dataset (.npy): the RKNN input before mean/std."""
        raise NotImplementedError


class ConvLayout(InputLayout):
    """transformers' layout: the tile as NCHW pixels into the 16x16 (or 14x14) stride-patch Conv."""

    name = "conv"
    rknn_normalizes = True
    rknn_data_format = "nhwc"

    def onnx_input_shape(self, geometry: VisionGeometry) -> tuple[int, ...]:
        return (1, 3, geometry.tile, geometry.tile)

    def embed(self, embeddings: Any, x: Any) -> Any:
        return embeddings.patch_embedding(x).flatten(2).transpose(1, 2)

    def onnx_input(self, tiles: np.ndarray, settings: SplitSettings) -> np.ndarray:
        return normalize_tiles(tiles, settings)

    def rknn_input(self, tile: np.ndarray) -> np.ndarray:
        return np.ascontiguousarray(tile[None])

    def calibration_array(self, tile: np.ndarray) -> np.ndarray:
        # NCHW raw 0..255: the toolkit applies the baked-in mean/std itself (pre-normalized data
        # here was measured to give cosine 0.70).
        return np.ascontiguousarray(tile.transpose(2, 0, 1)[None].astype(np.float32))


LAYOUTS: dict[str, InputLayout] = {layout.name: layout for layout in (ConvLayout(),)}


def get_layout(name: str) -> InputLayout:
    try:
        return LAYOUTS[name]
    except KeyError:
        raise ValueError(f"unknown vision input layout '{name}' (known: {', '.join(LAYOUTS)})") from None


def _vision_tower_class():
    """The torch module wrapping (vision_model, connector); defined lazily so board-side imports stay torch-free."""
    import torch
    from torch import nn

    class VisionTower(nn.Module):
        """One tile -> [1, N, text_hidden]: patch embedding (per layout) + positions + encoder + connector."""

        def __init__(self, vision_model: nn.Module, connector: nn.Module, layout: InputLayout):
            super().__init__()
            self.vision_model = vision_model
            self.connector = connector
            self.layout = layout
            cfg = vision_model.config
            proj = connector.modality_projection.proj
            self.geometry = VisionGeometry(
                tile=int(cfg.image_size),
                patch=int(cfg.patch_size),
                scale_factor=int(connector.scale_factor),
                vision_hidden=int(cfg.hidden_size),
                text_hidden=int(proj.out_features),
            )

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            vm = self.vision_model
            hidden = self.layout.embed(vm.embeddings, x)
            # Every tile is unpadded, so position ids are 0..P-1: add the table itself (no bucketize).
            hidden = hidden + vm.embeddings.position_embedding.weight.unsqueeze(0)
            hidden = vm.encoder(inputs_embeds=hidden, attention_mask=None).last_hidden_state
            hidden = vm.post_layernorm(hidden)
            return self.connector(hidden)

        @torch.no_grad()
        def reference(self, pixels: np.ndarray) -> np.ndarray:
            """transformers' own vision forward (bucketized positions) + connector on normalized [n,3,T,T] tiles."""
            out = []
            for tile in pixels:
                x = torch.from_numpy(np.ascontiguousarray(tile[None], dtype=np.float32))
                features = self.vision_model(pixel_values=x).last_hidden_state
                out.append(self.connector(features)[0].numpy())
            return np.stack(out)

    return VisionTower


def vision_tower(vision_model: Any, connector: Any, layout: str = "conv", attention: str = "eager") -> Any:
    """Wrap a vision model + connector for export; `attention` picks the transformers attention code
    whose ops end up in the graph ('eager': MatMul/Softmax/MatMul; 'sdpa': the exporter's decomposition)."""
    vision_model.set_attn_implementation(attention)
    tower = _vision_tower_class()(vision_model, connector, get_layout(layout))
    return tower.eval()


def load_vision_tower(checkpoint: Any, layout: str = "conv", attention: str = "eager") -> Any:
    """The vision tower of a Checkpoint (host.checkpoint), the text model dropped to free its memory."""
    model = checkpoint.load_model()
    inner = model.model
    tower = vision_tower(inner.vision_model, inner.connector, layout, attention)
    del model, inner
    return tower


def random_vision_tower(
    vision_config: dict[str, Any], text_hidden: int, scale_factor: int, *, seed: int = 0, layout: str = "conv"
) -> Any:
    """A vision tower + connector with random weights and the given shapes (no text model is built).

    Benchmarks use it for the full-size shapes without downloading a checkpoint; norms and biases get
    a little noise too so no layer is an identity.
    """
    import torch
    from transformers import Idefics3Config
    from transformers.models.idefics3.modeling_idefics3 import Idefics3Connector, Idefics3VisionTransformer

    config = Idefics3Config(
        vision_config=dict(vision_config),
        text_config={"model_type": "llama", "hidden_size": text_hidden, "num_hidden_layers": 1},
        scale_factor=scale_factor,
    )
    torch.manual_seed(seed)
    vision_model = Idefics3VisionTransformer._from_config(config.vision_config)
    connector = Idefics3Connector(config)
    with torch.no_grad():
        for module in (vision_model, connector):
            for p in module.parameters():
                p.add_(torch.randn_like(p) * 0.02)
    return vision_tower(vision_model.eval(), connector.eval(), layout)


def export_onnx(tower: Any, path: str | Path, opset: int = DEFAULT_OPSET) -> Path:
    """Export the tower for one tile with torch's legacy (TorchScript) exporter.

    The dynamo exporter's graphs are not what rknn-toolkit2 2.5.0 was checked with; the legacy one
    gives plain MatMul/Softmax/LayerNormalization/Gelu nodes.
    """
    import torch

    if not 17 <= opset <= 19:
        raise ValueError(f"opset {opset}: rknn-toolkit2 2.5.0 takes opsets 17-19 for this graph")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    dummy = torch.zeros(tower.layout.onnx_input_shape(tower.geometry), dtype=torch.float32)
    with torch.no_grad(), warnings.catch_warnings():
        # the connector's int(seq ** 0.5) is constant per geometry, which is what a one-tile graph wants
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        torch.onnx.export(
            tower,
            (dummy,),
            str(path),
            dynamo=False,
            opset_version=opset,
            input_names=[INPUT_NAME],
            output_names=[OUTPUT_NAME],
            do_constant_folding=True,
        )
    return path


def agreement(actual: np.ndarray, expected: np.ndarray) -> dict[str, float]:
    """How close per-tile features are: cosine over each whole tile (min/mean), the worst single
    token's cosine, and the max abs error, all against `expected` ([n, N, hidden])."""
    a = actual.reshape(len(actual), -1).astype(np.float64)
    e = expected.reshape(len(expected), -1).astype(np.float64)
    cos = (a * e).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(e, axis=1) + 1e-30)
    at = actual.reshape(-1, actual.shape[-1]).astype(np.float64)
    et = expected.reshape(-1, expected.shape[-1]).astype(np.float64)
    tok = (at * et).sum(1) / (np.linalg.norm(at, axis=1) * np.linalg.norm(et, axis=1) + 1e-30)
    return {
        "cosine_min": float(cos.min()),
        "cosine_mean": float(cos.mean()),
        "token_cosine_min": float(tok.min()),
        "max_abs_err": float(np.abs(a - e).max()),
        "ref_max_abs": float(np.abs(e).max()),
        "tiles": int(len(a)),
    }


def run_onnx(path: str | Path, inputs: np.ndarray) -> np.ndarray:
    """Run the exported graph in ONNX Runtime (CPU), one tile at a time as the board does."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return np.stack([session.run([OUTPUT_NAME], {INPUT_NAME: x[None]})[0][0] for x in inputs])


def validate_onnx(tower: Any, path: str | Path, tiles: np.ndarray, settings: SplitSettings) -> dict[str, float]:
    """ONNX Runtime vs the unmodified transformers path on uint8 NHWC tiles [n, T, T, 3]."""
    expected = tower.reference(normalize_tiles(tiles, settings))
    start = time.monotonic()
    actual = run_onnx(path, tower.layout.onnx_input(tiles, settings))
    report = agreement(actual, expected)
    report["ort_s_per_tile"] = (time.monotonic() - start) / len(tiles)
    return report


def reference_features(tower: Any, tiles: Sequence[np.ndarray] | np.ndarray, settings: SplitSettings) -> np.ndarray:
    """The oracle's features for uint8 NHWC tiles: transformers' path on the reference's normalization."""
    return tower.reference(normalize_tiles(np.asarray(tiles), settings))
