"""Vision tower + connector of a SmolVLM checkpoint, for ONE tile, as an ONNX graph the RKNN compiler takes.

The graph maps one tile to the `<image>` token embeddings it stands for: `[1, N, text_hidden]`, with
N = (tile / patch)^2 / scale^2 (64 for the 512/16 x4 family, 81 for 384/14 x3).

Why a wrapper instead of exporting transformers' module as it is: its patch-position code (fractional
coordinates + `bucketize`, there for padded images) exports an invalid graph. A tile the board sends
is never padded, so the position ids are simply 0..P-1 and the wrapper adds the position-embedding
table directly; the result is bit-identical to the reference (`VisionTower.reference` runs the
unmodified transformers path, and the tests compare the two).

The input side is a pluggable `InputLayout`, the export side of one of the board's layouts
(board.vision.LAYOUTS defines each layout's name, input shape and what the board feeds; the export
layout adds the patch embedding that consumes it and the calibration samples). Two layouts:
- `conv`, transformers' and Rockchip's demo: an NCHW tile into the 16x16/stride-16 Conv, the
  normalization baked into the RKNN input. The compiler runs that Conv at stride 4 with 3 input
  channels and keeps one output in 16: 192 M of its 364 M estimated cycles per 512 tile (fp16).
- `patches`: the tile as its patch rows [P, p*p*3 padded to 16] (`board.tiles.patchify`, a numpy reshape/transpose
  of the uint8 tile on the board) into one MatMul whose weights are the Conv's, reordered, with the
  normalization (board.tiles.normalization: v * scale + offset) folded into them (W * scale,
  bias + W . offset) and the position table folded into its bias. The board still feeds raw uint8
  values and nothing is baked into the input.
The encoder, post-norm, pixel shuffle and projection after the patch embedding are shared by every
layout. `GraphForms` picks how the exporter writes ops that compute the same thing (attention,
LayerNorm, the connector's pixel shuffle), so the compiler's handling of each can be measured
(scripts/vision_variants.py). The torch modules live in host.vision_modules, imported only where a
graph is built, so importing this module stays torch-free.
"""

from __future__ import annotations

import contextlib
import time
import warnings
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np

from board.tiles import SplitSettings, normalize_tiles, tokens_per_tile
from board.vision import LAYOUTS as BOARD_LAYOUTS
from board.vision import ConvFeed, PatchFeed, TileFeed

# Opset 17-19: GELU and LayerNorm export as single nodes the compiler fuses; 20 is rejected by it.
DEFAULT_OPSET = 18
# The default input layout, chosen by measurement (docs/vision_variants.md).
DEFAULT_LAYOUT = "patches"
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
    def tokens_per_tile(self) -> int:
        return tokens_per_tile(self.tile, self.patch, self.scale_factor)

    @property
    def output_shape(self) -> tuple[int, int, int]:
        return (1, self.tokens_per_tile, self.text_hidden)


@dataclass(frozen=True)
class GraphForms:
    """How the exporter writes ops that compute the same thing (all forms agree to float rounding).

    attention: transformers' attention code traced into the graph ('eager': MatMul/Softmax/MatMul;
      'sdpa': torch's scaled_dot_product_attention decomposition; 'explicit': the softmax written out
      as Exp/ReduceSum/Div, which the compiler does not fuse into exSDPAttention, so its estimate
      counts the attention's two products: a measure of what the fused form's 0 leaves out).
    layernorm: 'op' (one LayerNormalization node, opset >= 17) or 'decomposed' (ReduceMean/Sub/Pow/
      Sqrt/Div/Mul/Add), applied only while exporting.
    connector: the pixel shuffle before the projection: 'blocks' (one 5-D transpose to transformers'
      order; the default: at 384/14 transformers' own form leaves a Transpose on the CPU, and at 512/16
      it costs a gather the compiler counts), 'reference' (transformers' two 4-D permutes, the
      demo-style export) or 'conv' (NHWC->NCHW, then a stride-s Conv that holds the projection's
      weights: space-to-depth and projection in one op). docs/vision_variants.md has the measurements.
    """

    attention: str = "eager"
    layernorm: str = "op"
    connector: str = "blocks"

    CHOICES = {"attention": ("eager", "sdpa", "explicit"), "layernorm": ("op", "decomposed"),
               "connector": ("reference", "blocks", "conv")}

    def __post_init__(self) -> None:
        for name, choices in self.CHOICES.items():
            if getattr(self, name) not in choices:
                raise ValueError(f"graph form {name}='{getattr(self, name)}' is not one of {choices}")


# transformers' graph as it writes it: with the Conv layout, the demo-style export every speed figure is compared to.
REFERENCE_FORMS = GraphForms(connector="reference")


class InputLayout(TileFeed):
    """The export side of a board vision layout (board.vision.TileFeed, which defines the layout's name,
    input shape and feeds): the graph's patch embedding and the toolkit's calibration samples.

    One subclass per board layout, registered in LAYOUTS under the board's name, so the export, the
    RKNN build, the calibration set, the accuracy check and the board can never disagree about it.
    An instance is bound to the model's patch size.
    """

    def embedding(self, embeddings: Any, settings: SplitSettings | None) -> Any:
        """A torch module (host.vision_modules): the graph's input x -> patch embeddings + positions [1, P, D]."""
        raise NotImplementedError

    def calibration_array(self, tile: np.ndarray) -> np.ndarray:
        """One calibration sample for rknn-toolkit2's dataset (.npy): the RKNN input before mean/std."""
        raise NotImplementedError

    # The toolkit's names for the board's feed: the simulator check gets exactly what rknnlite gets.
    @property
    def manifest_name(self) -> str:
        return self.name

    @property
    def rknn_data_format(self) -> str | None:
        return self.npu_data_format

    def rknn_input(self, tile: np.ndarray) -> np.ndarray:
        return self.npu_input(tile)

    def onnx_input_shape(self, geometry: VisionGeometry) -> tuple[int, ...]:
        return self.input_shape(geometry.tile)


class ConvLayout(InputLayout, ConvFeed):
    """transformers' layout: the tile as NCHW pixels into the 16x16 (or 14x14) stride-patch Conv."""

    def embedding(self, embeddings: Any, settings: SplitSettings | None) -> Any:
        from host.vision_modules import ConvPatchEmbedding

        return ConvPatchEmbedding(embeddings)

    def calibration_array(self, tile: np.ndarray) -> np.ndarray:
        # NCHW raw 0..255: the toolkit applies the baked-in mean/std itself (pre-normalized data
        # here was measured to give cosine 0.70).
        return np.ascontiguousarray(tile.transpose(2, 0, 1)[None].astype(np.float32))


class PatchLayout(InputLayout, PatchFeed):
    """The tile as its patch rows (board.tiles.patchify), into a MatMul holding the folded Conv weights.

    RKNN input: uint8 [1, P, L], a 3-D tensor (L = p*p*3 padded to a multiple of 16: [1024, 768] at
    512/16, [729, 592] at 384/14, see board.tiles.PATCH_ROW_ALIGN). rknn-toolkit2 2.5.0 builds it from a float32 ONNX
    input of that shape and converts a uint8 array fed at inference itself; `data_format` only applies
    to 4-D inputs and mean_values/std_values (image inputs only) are not used: the normalization is in
    the weights. Calibration .npy files hold the same [1, P, L] rows as float32 raw 0..255 values
    (the toolkit also took [P, L] and uint8 files; checked on a small model).
    """

    def embedding(self, embeddings: Any, settings: SplitSettings | None) -> Any:
        from host.vision_modules import FoldedPatchEmbedding

        if settings is None:
            raise ValueError("the 'patches' layout folds the normalization into its weights: pass the checkpoint's settings")
        return FoldedPatchEmbedding(embeddings, settings, self.row_length)

    def calibration_array(self, tile: np.ndarray) -> np.ndarray:
        return self.npu_input(tile).astype(np.float32)


def export_layouts(*layouts: type[InputLayout]) -> dict[str, type[InputLayout]]:
    """The export layouts by the board's names (board.vision.LAYOUTS): refuses a board layout without
    its export, an export without its board layout, and an export that does not extend the board's."""
    registry = {layout.kind: layout for layout in layouts}
    problems = [f"board layout '{k}' has no export layout" for k in BOARD_LAYOUTS if k not in registry]
    problems += [f"export layout '{k}' has no board layout" for k in registry if k not in BOARD_LAYOUTS]
    problems += [f"export layout '{k}' ({layout.__name__}) does not extend board.vision.{BOARD_LAYOUTS[k].__name__}"
                 for k, layout in registry.items() if k in BOARD_LAYOUTS and not issubclass(layout, BOARD_LAYOUTS[k])]
    if problems:
        raise TypeError("; ".join(problems))
    return registry


LAYOUTS = export_layouts(ConvLayout, PatchLayout)


def get_layout(name: str, patch: int | None = None) -> InputLayout:
    """The layout called `name` (a CLI choice), bound to the model's patch size."""
    try:
        return LAYOUTS[name](patch)
    except KeyError:
        raise ValueError(f"unknown vision input layout '{name}' (known: {', '.join(LAYOUTS)})") from None


def vision_tower(vision_model: Any, connector: Any, layout: str = "conv", attention: str | None = None, *,
                 settings: SplitSettings | None = None, forms: GraphForms | None = None) -> Any:
    """Wrap a vision model + connector for export. `settings` (the checkpoint's normalization) is needed
    by layouts that fold it into their weights; `forms` picks how ops are written (`attention` is a
    shorthand for forms.attention, kept for callers that only choose that)."""
    forms = forms or GraphForms()
    if attention is not None:
        forms = replace(forms, attention=attention)
    from host.vision_modules import VisionTower  # registers the 'explicit' attention with transformers

    vision_model.set_attn_implementation(forms.attention)
    tower = VisionTower(vision_model, connector, layout, settings, forms)
    return tower.eval()


def load_vision_tower(checkpoint: Any, layout: str = "conv", attention: str | None = None, *,
                      forms: GraphForms | None = None) -> Any:
    """The vision tower of a Checkpoint (host.checkpoint), the text model dropped to free its memory."""
    model = checkpoint.load_model()
    inner = model.model
    settings = SplitSettings.from_preprocessor(checkpoint.preprocessor)
    tower = vision_tower(inner.vision_model, inner.connector, layout, attention, settings=settings, forms=forms)
    del model, inner
    return tower


def random_vision_tower(
    vision_config: dict[str, Any], text_hidden: int, scale_factor: int, *, seed: int = 0, layout: str = "conv",
    settings: SplitSettings | None = None, forms: GraphForms | None = None,
) -> Any:
    """A vision tower + connector with random weights and the given shapes (no text model is built).

    Benchmarks use it for the full-size shapes without downloading a checkpoint; norms and biases get
    a little noise too so no layer is an identity. The same seed gives the same weights in every layout.
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
    return vision_tower(vision_model.eval(), connector.eval(), layout, settings=settings, forms=forms)


@contextlib.contextmanager
def _export_forms(tower: Any) -> Iterator[None]:
    """Swap in the export-only forms (decomposed LayerNorms) for the duration of an export."""
    if tower.forms.layernorm != "decomposed":
        yield
        return
    from torch import nn

    from host.vision_modules import DecomposedLayerNorm

    swapped = [(parent, name, child) for parent in list(tower.vision_model.modules())
               for name, child in parent.named_children() if isinstance(child, nn.LayerNorm)]
    for parent, name, child in swapped:
        setattr(parent, name, DecomposedLayerNorm(child))
    try:
        yield
    finally:
        for parent, name, child in swapped:
            setattr(parent, name, child)


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
    with torch.no_grad(), warnings.catch_warnings(), _export_forms(tower):
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
