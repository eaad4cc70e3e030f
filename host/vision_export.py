"""Vision tower + connector of a SmolVLM checkpoint, for ONE tile, as an ONNX graph the RKNN compiler takes.

The graph maps one tile to the `<image>` token embeddings it stands for: `[1, N, text_hidden]`, with
N = (tile / patch)^2 / scale^2 (64 for the 512/16 x4 family, 81 for 384/14 x3).

Why a wrapper instead of exporting transformers' module as it is: its patch-position code (fractional
coordinates + `bucketize`, there for padded images) exports an invalid graph. A tile the board sends
is never padded, so the position ids are simply 0..P-1 and the wrapper adds the position-embedding
table directly; the result is bit-identical to the reference (`VisionTower.reference` runs the
unmodified transformers path, and the tests compare the two).

The input side is a pluggable `InputLayout`: how the tile enters the graph (its shape, the patch
embedding that consumes it, what the RKNN build bakes in, what the board feeds). Two layouts:
- `conv`, transformers' and Rockchip's demo: an NCHW tile into the 16x16/stride-16 Conv, the
  normalization baked into the RKNN input. The compiler runs that Conv at stride 4 with 3 input
  channels and keeps one output in 16: 192 M of its 364 M estimated cycles per 512 tile (fp16).
- `patches`: the tile as its patch rows [P, p*p*3 padded to 16] (`board.tiles.patchify`, a numpy reshape/transpose
  of the uint8 tile on the board) into one MatMul whose weights are the Conv's, reordered, with the
  normalization folded into them (W * rescale/std, bias - W . mean/std) and the position table
  folded into its bias. The board still feeds raw uint8 values and nothing is baked into the input.
The encoder, post-norm, pixel shuffle and projection after the patch embedding are shared by every
layout. `GraphForms` picks how the exporter writes ops that compute the same thing (attention,
LayerNorm, the connector's pixel shuffle), so the compiler's handling of each can be measured
(scripts/vision_variants.py).
"""

from __future__ import annotations

import contextlib
import functools
import time
import warnings
from dataclasses import dataclass, replace
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Iterator, Sequence

import numpy as np

from board.tiles import SplitSettings, normalize_tiles, patch_row_length, patchify, tokens_per_tile

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
    def n_patches(self) -> int:
        return self.grid**2

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


class InputLayout:
    """How a tile enters the graph; one subclass per layout, registered in LAYOUTS.

    Everything that depends on the layout lives here, so the export, the RKNN build, the calibration
    set and the accuracy check can never disagree about it. An instance is bound to a patch size.
    """

    name: str
    # True: the graph takes normalized pixels and the RKNN build bakes mean/std in (board feeds uint8).
    # False: the graph itself starts from raw 0..255 values (normalization folded into its weights).
    rknn_normalizes: bool
    # How rknn.inference is told the layout of rknn_input() ('nhwc' for image tiles, None otherwise).
    rknn_data_format: str | None

    def __init__(self, patch: int | None = None):
        self.patch = patch

    @property
    def manifest_name(self) -> str:
        """The bundle manifest's vision.layout: the key board.vision.tile_feed resolves."""
        return self.name

    def onnx_input_shape(self, geometry: VisionGeometry) -> tuple[int, ...]:
        raise NotImplementedError

    def embedding(self, embeddings: Any, settings: SplitSettings | None) -> Any:
        """A torch module: the graph's input x -> patch embeddings + positions [1, P, D]."""
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

    def embedding(self, embeddings: Any, settings: SplitSettings | None) -> Any:
        return _modules().ConvPatchEmbedding(embeddings)

    def onnx_input(self, tiles: np.ndarray, settings: SplitSettings) -> np.ndarray:
        return normalize_tiles(tiles, settings)

    def rknn_input(self, tile: np.ndarray) -> np.ndarray:
        return np.ascontiguousarray(tile[None])

    def calibration_array(self, tile: np.ndarray) -> np.ndarray:
        # NCHW raw 0..255: the toolkit applies the baked-in mean/std itself (pre-normalized data
        # here was measured to give cosine 0.70).
        return np.ascontiguousarray(tile.transpose(2, 0, 1)[None].astype(np.float32))


class PatchLayout(InputLayout):
    """The tile as its patch rows (board.tiles.patchify), into a MatMul holding the folded Conv weights.

    RKNN input: uint8 [1, P, L], a 3-D tensor (L = p*p*3 padded to a multiple of 16: [1024, 768] at
    512/16, [729, 592] at 384/14, see board.tiles.PATCH_ROW_ALIGN). rknn-toolkit2 2.5.0 builds it from a float32 ONNX
    input of that shape and converts a uint8 array fed at inference itself; `data_format` only applies
    to 4-D inputs and mean_values/std_values (image inputs only) are not used: the normalization is in
    the weights. Calibration .npy files hold the same [1, P, L] rows as float32 raw 0..255 values
    (the toolkit also took [P, L] and uint8 files; checked on a small model).
    """

    name = "patches"
    rknn_normalizes = False
    rknn_data_format = None

    def __init__(self, patch: int | None = None):
        if not patch:
            raise ValueError("the 'patches' layout needs the model's patch size")
        super().__init__(patch)

    @property
    def manifest_name(self) -> str:
        # the board cannot ask rknnlite for the model's input shape, so the patch size travels in the name
        return f"{self.name}{self.patch}"

    def onnx_input_shape(self, geometry: VisionGeometry) -> tuple[int, ...]:
        return (1, geometry.n_patches, patch_row_length(geometry.patch))

    def embedding(self, embeddings: Any, settings: SplitSettings | None) -> Any:
        if settings is None:
            raise ValueError("the 'patches' layout folds the normalization into its weights: pass the checkpoint's settings")
        return _modules().FoldedPatchEmbedding(embeddings, settings)

    def onnx_input(self, tiles: np.ndarray, settings: SplitSettings) -> np.ndarray:
        return patchify(tiles, self.patch).astype(np.float32)

    def rknn_input(self, tile: np.ndarray) -> np.ndarray:
        return patchify(tile[None], self.patch)

    def calibration_array(self, tile: np.ndarray) -> np.ndarray:
        return patchify(tile[None], self.patch).astype(np.float32)


LAYOUTS: dict[str, type[InputLayout]] = {layout.name: layout for layout in (ConvLayout, PatchLayout)}


def get_layout(name: str, patch: int | None = None) -> InputLayout:
    """The layout called `name` (a CLI choice), bound to the model's patch size."""
    try:
        return LAYOUTS[name](patch)
    except KeyError:
        raise ValueError(f"unknown vision input layout '{name}' (known: {', '.join(LAYOUTS)})") from None


@functools.cache
def _modules() -> SimpleNamespace:
    """The torch modules of the export, defined on first use so board-side imports stay torch-free."""
    import torch
    from torch import nn

    class ConvPatchEmbedding(nn.Module):
        """transformers' patch embedding (Conv, flatten, transpose) + the position table, as its code does."""

        def __init__(self, embeddings: nn.Module):
            super().__init__()
            self.conv = embeddings.patch_embedding
            self.position = embeddings.position_embedding

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            # every tile is unpadded, so position ids are 0..P-1: add the table itself (no bucketize)
            return self.conv(x).flatten(2).transpose(1, 2) + self.position.weight.unsqueeze(0)

        def extra_repr(self) -> str:
            return "conv + positions"

    class FoldedPatchEmbedding(nn.Module):
        """Raw 0..255 patch rows [1, P, L] (board.tiles.patchify) -> x @ W + B == the Conv on normalized pixels.

        With n = x * rescale / std_c - mean_c / std_c per channel: W = conv weights * rescale / std_c,
        reordered to the rows' (y, x, c) order; B = conv bias - sum(conv weights * mean_c / std_c) + the
        position table. Folded in float64, stored float32.
        """

        def __init__(self, embeddings: nn.Module, settings: SplitSettings):
            super().__init__()
            conv = embeddings.patch_embedding
            weight = conv.weight.detach().double()  # [D, 3, p, p]
            mean = torch.tensor(settings.image_mean, dtype=torch.float64).view(1, 3, 1, 1)
            std = torch.tensor(settings.image_std, dtype=torch.float64).view(1, 3, 1, 1)
            scaled = weight * (settings.rescale_factor / std)
            bias = conv.bias.detach().double() - (weight * (mean / std)).sum((1, 2, 3))
            positions = embeddings.position_embedding.weight.detach().double()
            # [D, 3, p, p] -> [p, p, 3, D] -> [p*p*3, D]: x @ weight with no transpose left in the graph;
            # zero rows for the row padding (board.tiles.PATCH_ROW_ALIGN)
            folded = scaled.permute(2, 3, 1, 0).reshape(-1, weight.shape[0])
            pad = patch_row_length(conv.kernel_size[0]) - folded.shape[0]
            folded = torch.cat([folded, folded.new_zeros(pad, folded.shape[1])])
            self.weight = nn.Parameter(folded.float(), requires_grad=False)
            self.bias = nn.Parameter((bias.unsqueeze(0) + positions).unsqueeze(0).float(), requires_grad=False)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.matmul(x, self.weight) + self.bias

    class BlockShuffle(nn.Module):
        """The connector's pixel shuffle as one 5-D transpose (the same order as transformers'), then the projection."""

        def __init__(self, connector: nn.Module, grid: int):
            super().__init__()
            self.proj, self.scale, self.grid = connector.modality_projection.proj, int(connector.scale_factor), grid

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            g, s, d = self.grid, self.scale, x.shape[-1]
            # token (I, J) holds rows (I*s + dy, J*s + dx) in (dy, dx, d) order: [G/s, s, G/s, s, D] -> [G/s, G/s, s, s, D]
            blocks = x.reshape(g // s, s, g // s, s, d).permute(0, 2, 1, 3, 4)
            return self.proj(blocks.reshape(1, (g // s) ** 2, s * s * d))

    class ConvShuffle(nn.Module):
        """Pixel shuffle + projection as one stride-s Conv on the [1, D, G, G] feature map (same result)."""

        def __init__(self, connector: nn.Module, grid: int):
            super().__init__()
            proj, s = connector.modality_projection.proj, int(connector.scale_factor)
            d = proj.in_features // (s * s)
            self.grid = grid
            self.conv = nn.Conv2d(d, proj.out_features, kernel_size=s, stride=s, bias=proj.bias is not None)
            with torch.no_grad():
                # projection input index (dy, dx, d) -> Conv weight [out, d, dy, dx]
                self.conv.weight.copy_(proj.weight.reshape(proj.out_features, s, s, d).permute(0, 3, 1, 2))
                if proj.bias is not None:
                    self.conv.bias.copy_(proj.bias)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            g, d = self.grid, x.shape[-1]
            grid = x.reshape(1, g, g, d).permute(0, 3, 1, 2)
            return self.conv(grid).flatten(2).transpose(1, 2)

    class DecomposedLayerNorm(nn.Module):
        """LayerNorm written out (mean, variance, rsqrt, affine) for the export of GraphForms.layernorm='decomposed'."""

        def __init__(self, norm: nn.LayerNorm):
            super().__init__()
            self.norm = norm

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            # elementwise ops keep a transposed input's strides, and the connector's view() needs
            # contiguous rows (LayerNorm's own kernel returns them); a no-op in the ONNX graph
            x = x.contiguous()
            mean = x.mean(-1, keepdim=True)
            centered = x - mean
            var = (centered * centered).mean(-1, keepdim=True)
            return centered / torch.sqrt(var + self.norm.eps) * self.norm.weight + self.norm.bias

    def explicit_attention(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                           attention_mask: torch.Tensor | None, scaling: float, dropout: float = 0.0,
                           **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """transformers' eager attention with the softmax written out (GraphForms.attention='explicit').

        Shifted by the row mean (softmax does not change with a per-row shift): an unshifted softmax
        is fused into exSDPAttention again, and a max shift leaves a ReduceMax on the CPU.
        """
        scores = torch.matmul(query, key.transpose(-1, -2)) * scaling
        if attention_mask is not None:
            scores = scores + attention_mask
        weights = torch.exp(scores - scores.mean(-1, keepdim=True))
        weights = weights / weights.sum(-1, keepdim=True)
        return torch.matmul(weights, value).transpose(1, 2).contiguous(), weights

    from transformers import AttentionInterface

    AttentionInterface.register("explicit", explicit_attention)

    class VisionTower(nn.Module):
        """One tile -> [1, N, text_hidden]: patch embedding + positions (per layout), encoder, connector."""

        def __init__(self, vision_model: nn.Module, connector: nn.Module, layout: str,
                     settings: SplitSettings | None, forms: GraphForms):
            super().__init__()
            self.vision_model = vision_model
            self.connector = connector
            cfg = vision_model.config
            proj = connector.modality_projection.proj
            self.geometry = VisionGeometry(
                tile=int(cfg.image_size),
                patch=int(cfg.patch_size),
                scale_factor=int(connector.scale_factor),
                vision_hidden=int(cfg.hidden_size),
                text_hidden=int(proj.out_features),
            )
            self.layout = get_layout(layout, self.geometry.patch)
            self.forms = forms
            self.patch_embed = self.layout.embedding(vision_model.embeddings, settings)
            shuffles = {"reference": None, "blocks": BlockShuffle, "conv": ConvShuffle}
            shuffle = shuffles[forms.connector]
            self.connect = connector if shuffle is None else shuffle(connector, self.geometry.grid)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            vm = self.vision_model
            hidden = self.patch_embed(x)
            hidden = vm.encoder(inputs_embeds=hidden, attention_mask=None).last_hidden_state
            hidden = vm.post_layernorm(hidden)
            return self.connect(hidden)

        @torch.no_grad()
        def reference(self, pixels: np.ndarray) -> np.ndarray:
            """transformers' own vision forward (bucketized positions) + connector on normalized [n,3,T,T] tiles."""
            out = []
            for tile in pixels:
                x = torch.from_numpy(np.ascontiguousarray(tile[None], dtype=np.float32))
                features = self.vision_model(pixel_values=x).last_hidden_state
                out.append(self.connector(features)[0].numpy())
            return np.stack(out)

    return SimpleNamespace(**{cls.__name__: cls for cls in (
        ConvPatchEmbedding, FoldedPatchEmbedding, BlockShuffle, ConvShuffle, DecomposedLayerNorm, VisionTower)})


def vision_tower(vision_model: Any, connector: Any, layout: str = "conv", attention: str | None = None, *,
                 settings: SplitSettings | None = None, forms: GraphForms | None = None) -> Any:
    """Wrap a vision model + connector for export. `settings` (the checkpoint's normalization) is needed
    by layouts that fold it into their weights; `forms` picks how ops are written (`attention` is a
    shorthand for forms.attention, kept for callers that only choose that)."""
    forms = forms or GraphForms()
    if attention is not None:
        forms = replace(forms, attention=attention)
    modules = _modules()  # registers the 'explicit' attention with transformers
    vision_model.set_attn_implementation(forms.attention)
    tower = modules.VisionTower(vision_model, connector, layout, settings, forms)
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

    swapped = [(parent, name, child) for parent in list(tower.vision_model.modules())
               for name, child in parent.named_children() if isinstance(child, nn.LayerNorm)]
    for parent, name, child in swapped:
        setattr(parent, name, _modules().DecomposedLayerNorm(child))
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
