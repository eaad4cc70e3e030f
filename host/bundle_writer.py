"""Write a bundle's manifest: the settings the board follows and a checksum of every file.

The names (files, keys, format version) live in board/bundle_schema.py and board/bundle.py holds the
one reader the board and the host share; this module only assembles the values from a checkpoint and
the build stages, under those names.
"""

from __future__ import annotations

import json
import os
import platform
import time
from pathlib import Path
from typing import Any, Optional

import numpy as np

from board import __version__ as PACKAGE_VERSION
from board import bundle as B
from board import bundle_schema as S
from board.prompt import PromptFormat
from board.system_checks import package_version
from board.tiles import tokens_per_tile
from board.vision import tile_feed
from host.checkpoint import Checkpoint

M = S.Manifest


def toolkit_versions() -> dict[str, Optional[str]]:
    """Versions of everything that shaped the bundle, recorded for diagnosis on the board."""
    K = S.Toolkits
    packages = (K.RKNN_TOOLKIT2, K.RKLLM_TOOLKIT, K.TRANSFORMERS, K.TORCH, K.ONNX)  # keyed by package name
    return {K.SMOLVLM_RK3588: PACKAGE_VERSION, **{name: package_version(name) for name in packages},
            K.PYTHON: platform.python_version()}


def token_entry(tokenizer, token: Optional[str]) -> Optional[dict[str, Any]]:
    if token is None:
        return None
    token_id = tokenizer.convert_tokens_to_ids(token)
    return {S.SpecialToken.TEXT: token, S.SpecialToken.ID: int(token_id) if token_id is not None else None}


def tokenizer_section(tokenizer, fmt: PromptFormat) -> dict[str, Any]:
    """Special tokens by role, with ids, as this checkpoint's tokenizer defines them."""
    K, R = S.Tokenizer, S.SpecialTokens
    image_id = tokenizer.convert_tokens_to_ids(fmt.image_token)
    return {
        K.FILE: S.TOKENIZER,
        K.IMAGE_TOKEN_ID: int(image_id),
        K.VOCAB_SIZE: len(tokenizer),
        K.SPECIAL_TOKENS: {
            R.BOS: token_entry(tokenizer, tokenizer.bos_token),
            R.EOS: token_entry(tokenizer, tokenizer.eos_token),
            R.PAD: token_entry(tokenizer, tokenizer.pad_token),
            R.UNK: token_entry(tokenizer, tokenizer.unk_token),
            R.IMAGE: token_entry(tokenizer, fmt.image_token),
            R.FAKE_IMAGE: token_entry(tokenizer, fmt.fake_image_token),
            R.GLOBAL_IMAGE: token_entry(tokenizer, fmt.global_image_token),
        },
    }


def eos_token_ids(checkpoint: Checkpoint, tokenizer, end_of_turn_id: Optional[int] = None) -> list[int]:
    """The ids that end an answer: the chat template's end-of-turn token first when known
    (host.decoder_export.end_of_turn_token_id: <end_of_utterance> for SmolVLM), then the generation
    config's eos and the tokenizer's eos.

    A wrong EOS is a known cause of never-ending answers on boards, so every source is merged; an
    extra stop id (an older upload's <|im_end|>) only ends an answer that is over anyway.
    """
    ids: list[int] = []
    gen_path = checkpoint.path / "generation_config.json"
    if gen_path.exists():
        eos = json.loads(gen_path.read_text()).get("eos_token_id")
        ids.extend([eos] if isinstance(eos, int) else list(eos or []))
    if tokenizer.eos_token_id is not None:
        ids.append(int(tokenizer.eos_token_id))
    rest = sorted(set(int(i) for i in ids) - {end_of_turn_id})
    return ([int(end_of_turn_id)] if end_of_turn_id is not None else []) + rest


def generation_section(checkpoint: Checkpoint, tokenizer, end_of_turn_id: Optional[int]) -> dict[str, Any]:
    K = S.Generation
    return {
        K.EOS_TOKEN_IDS: eos_token_ids(checkpoint, tokenizer, end_of_turn_id),
        K.END_OF_TURN_TOKEN: tokenizer.convert_ids_to_tokens(end_of_turn_id),
        K.BOS_TOKEN_ID: tokenizer.bos_token_id,
        K.PAD_TOKEN_ID: tokenizer.pad_token_id,
    }


def model_section(checkpoint: Checkpoint) -> dict[str, Any]:
    K = S.Model
    return {
        K.ID: checkpoint.model_id,
        K.REVISION: checkpoint.revision,
        K.MODEL_TYPE: checkpoint.model_type,
        K.FAMILY: checkpoint.family,
        K.TINY: checkpoint.is_tiny,
        K.NOTE: checkpoint.note,
    }


def embeddings_section(table: np.ndarray) -> dict[str, Any]:
    K = S.Embeddings
    return {K.FILE: S.EMBEDDINGS, K.DTYPE: str(table.dtype), K.SHAPE: list(table.shape)}


def npu_input_section(layout: str, tile: int) -> dict[str, Any]:
    """What rknnlite is fed for one tile in this layout (board.vision's registry): an NHWC uint8 image
    for `conv`, the uint8 patch rows [1, patches, row] for `patches<p>`."""
    I, feed = S.VisionInput, tile_feed(layout)
    shape = [1, tile, tile, 3] if feed.npu_data_format == "nhwc" else [1, *feed.input_shape(tile)[-2:]]
    return {I.SHAPE: shape, I.DTYPE: "uint8", I.FORMAT: feed.npu_data_format or "patch_rows", I.COLOR: "rgb"}


def vision_section(report: dict[str, Any]) -> dict[str, Any]:
    """What the board needs to feed vision.rknn and what the build measured (host.vision_rknn's report)."""
    K = S.Vision
    geometry = report["geometry"]  # host.vision_export.VisionGeometry's fields
    tile, patch, scale = int(geometry["tile"]), int(geometry["patch"]), int(geometry["scale_factor"])
    tokens = tokens_per_tile(tile, patch, scale)
    accuracy = report["accuracy"]
    return {
        K.FILE: S.VISION_RKNN,
        K.ONNX: S.VISION_ONNX,
        K.DTYPE: report["dtype"],
        K.LAYOUT: report["layout"],
        K.TILE: tile,
        K.TOKENS_PER_TILE: tokens,
        K.PATCH: patch,
        K.SCALE_FACTOR: scale,
        K.INPUT: npu_input_section(report["layout"], tile),
        K.OUTPUT_SHAPE: [1, tokens, int(geometry["text_hidden"])],
        K.TARGET_PLATFORM: report["target_platform"],
        K.QUANTIZATION: report.get("quantization"),
        K.ACCURACY: {k: accuracy[k] for k in S.keys(S.VisionAccuracy)},  # the report names them alike
        K.EST_CYCLES_PER_TILE: report.get("ops", {}).get("est_cycles_per_tile"),
    }


def decoder_section(hf_config: dict[str, Any], *, max_context: int, rkllm: Optional[dict[str, Any]],
                    embed_flash: bool = False) -> dict[str, Any]:
    """The decoder's shape (from the extracted folder's config.json) and, when built, how decoder.rkllm was made
    (host.rkllm_runner's report: toolkit, options, calibration evidence, accuracy)."""
    K = S.Decoder
    section: dict[str, Any] = {
        K.FILE: S.DECODER_RKLLM if rkllm else None,
        K.HF_FOLDER: S.DECODER_HF,
        K.HIDDEN_SIZE: int(hf_config["hidden_size"]),
        K.VOCAB_SIZE: int(hf_config["vocab_size"]),
        K.NUM_HIDDEN_LAYERS: int(hf_config["num_hidden_layers"]),
        K.MAX_CONTEXT: int(max_context),
        K.MAX_POSITION_EMBEDDINGS: int(hf_config["max_position_embeddings"]),
        K.EMBED_FLASH: bool(embed_flash),
    }
    if rkllm:
        options = rkllm["options"]  # host.decoder_rkllm.RKLLMOptions' fields
        section.update({
            K.TOOLKIT: rkllm.get("toolkit"),
            K.QUANTIZED_DTYPE: options["quantized_dtype"],
            K.QUANTIZED_ALGORITHM: options["quantized_algorithm"],
            K.TARGET_PLATFORM: options["target_platform"],
            K.NUM_NPU_CORE: options["num_npu_core"],
            K.OPTIMIZATION_LEVEL: options["optimization_level"],
            K.CALIBRATION: rkllm.get("calibration") or {},
            K.ACCURACY: {k: v for k, v in (rkllm.get("accuracy") or {}).items() if k not in ("samples", "not_measured")},
        })
    else:
        section[K.MISSING] = "converted with --skip-decoder: no decoder.rkllm (x86 emulation uses hf_folder)"
    return section


def video_section(checkpoint: Checkpoint) -> Optional[dict[str, Any]]:
    """SmolVLM2's video settings (board/video.py reads them): the checkpoint's video_sampling and the
    reference processor's prompt pieces. None for checkpoints without video (SmolVLM v1)."""
    sampling = checkpoint.preprocessor.get("video_sampling")
    if not sampling:
        return None
    from transformers.models.smolvlm import processing_smolvlm as ref

    K = S.Video
    return {
        K.FPS: sampling["fps"],
        K.MAX_FRAMES: sampling["max_frames"],
        K.VIDEO_SIZE: sampling["video_size"],
        K.INTRO: ref.DEFAULT_VIDEO_INTRO,
        K.FRAME_TIMESTAMP: ref.FRAME_TIMESTAMP_MESSAGE,
        K.OUTRO: ref.DEFAULT_MEDIA_OUTTRO,
    }


def write_manifest(
    root: Path,
    *,
    checkpoint: Checkpoint,
    prompt_format: PromptFormat,
    tokenizer_info: dict[str, Any],
    vision: dict[str, Any],
    decoder: dict[str, Any],
    embeddings: dict[str, Any],
    generation: dict[str, Any],
    video: Optional[dict[str, Any]] = None,
    reference: Optional[dict[str, Any]] = None,
    extra_files: tuple[str, ...] = (),
) -> dict[str, Any]:
    """Checksum every file of the bundle and write manifest.json (atomically, last: a bundle without a
    manifest is visibly unfinished)."""
    root = Path(root)
    board_files = [S.VISION_RKNN, S.EMBEDDINGS, S.TOKENIZER]
    if decoder.get(S.Decoder.FILE):
        board_files.append(S.DECODER_RKLLM)
    fallback = vision.get(S.Vision.FALLBACK)
    if fallback:
        board_files.append(fallback[S.VisionFallback.FILE])
    if reference:
        board_files.append(reference[S.Reference.FILE])
    host = [S.VISION_ONNX, S.DECODER_HF, *([fallback[S.VisionFallback.ONNX]] if fallback else []), *extra_files]
    host_files = [rel for rel in host if (root / rel).exists()]
    missing = [rel for rel in board_files if not (root / rel).is_file()]
    if missing:
        raise FileNotFoundError(f"cannot write the manifest: missing {', '.join(missing)} in {root}")
    manifest = {
        M.FORMAT: S.FORMAT_NAME,
        M.VERSION: S.FORMAT_VERSION,
        M.CREATED: time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        M.MODEL: model_section(checkpoint),
        M.TARGET: B.runtime_target(),
        M.TOOLKITS: toolkit_versions(),
        M.VISION: vision,
        M.DECODER: decoder,
        M.EMBEDDINGS: embeddings,
        M.TOKENIZER: tokenizer_info,
        M.PROMPT: prompt_format.to_dict(),
        M.PREPROCESSOR: checkpoint.preprocessor,
        M.GENERATION: generation,
        M.FILES: B.file_entries(root, board_files + host_files),
    }
    if video:
        manifest[M.VIDEO] = video
    if reference:
        manifest[M.REFERENCE] = reference
    S.validate(manifest)  # what the reader would refuse is not written
    tmp = root / (S.MANIFEST + ".tmp")
    tmp.write_text(json.dumps(manifest, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    os.replace(tmp, root / S.MANIFEST)
    return manifest
