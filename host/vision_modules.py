"""The torch modules of the vision export (host.vision_export), in their own module so that importing
the export's layouts, forms and checks stays torch-free: host.vision_export imports this module only
where a graph is built, and importing it registers the 'explicit' attention with transformers.

`VisionTower` is the exported graph for one tile: the layout's patch embedding (`ConvPatchEmbedding`
or `FoldedPatchEmbedding`), transformers' encoder and post-norm, then the connector (transformers'
own, `BlockShuffle` or `ConvShuffle`, per GraphForms.connector).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import nn
from transformers import AttentionInterface

from board.tiles import SplitSettings, normalization
from host.vision_export import GraphForms, VisionGeometry, get_layout


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

    With the normalization n = x * scale_c + offset_c (board.tiles.normalization): W = conv weights *
    scale_c, reordered to the rows' (y, x, c) order and zero-padded to L rows; B = conv bias +
    sum(conv weights * offset_c) + the position table. Folded in float64, stored float32.
    """

    def __init__(self, embeddings: nn.Module, settings: SplitSettings, row_length: int):
        super().__init__()
        conv = embeddings.patch_embedding
        weight = conv.weight.detach().double()  # [D, 3, p, p]
        scale, offset = (torch.from_numpy(v).view(1, 3, 1, 1) for v in normalization(settings))
        bias = conv.bias.detach().double() + (weight * offset).sum((1, 2, 3))
        positions = embeddings.position_embedding.weight.detach().double()
        # [D, 3, p, p] -> [p, p, 3, D] -> [p*p*3, D]: x @ weight with no transpose left in the graph;
        # zero rows for the row padding (board.tiles.PATCH_ROW_ALIGN)
        folded = (weight * scale).permute(2, 3, 1, 0).reshape(-1, weight.shape[0])
        folded = torch.cat([folded, folded.new_zeros(row_length - folded.shape[0], folded.shape[1])])
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


AttentionInterface.register("explicit", explicit_attention)

_SHUFFLES = {"reference": None, "blocks": BlockShuffle, "conv": ConvShuffle}


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
        shuffle = _SHUFFLES[forms.connector]
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
