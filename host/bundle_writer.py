"""Write a bundle's manifest: the settings the board follows and a checksum of every file.

The names (files, keys, format version) live in board/bundle.py, next to the one reader the board
and the host share; this module only assembles the values from a checkpoint and the build stages.
"""

from __future__ import annotations

import json
import os
import platform
import time
from importlib import metadata
from pathlib import Path
from typing import Any, Optional

import numpy as np

from board import __version__ as PACKAGE_VERSION
from board import bundle as B
from board.prompt import PromptFormat
from board.tiles import tokens_per_tile
from host.checkpoint import Checkpoint


def package_version(name: str) -> Optional[str]:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def toolkit_versions() -> dict[str, Optional[str]]:
    """Versions of everything that shaped the bundle, recorded for diagnosis on the board."""
    return {
        "smolvlm-rk3588": PACKAGE_VERSION,
        "rknn-toolkit2": package_version("rknn-toolkit2"),
        "rkllm-toolkit": package_version("rkllm-toolkit"),
        "transformers": package_version("transformers"),
        "torch": package_version("torch"),
        "onnx": package_version("onnx"),
        "python": platform.python_version(),
    }


def token_entry(tokenizer, token: Optional[str]) -> Optional[dict[str, Any]]:
    if token is None:
        return None
    token_id = tokenizer.convert_tokens_to_ids(token)
    return {"text": token, "id": int(token_id) if token_id is not None else None}


def tokenizer_section(tokenizer, fmt: PromptFormat) -> dict[str, Any]:
    """Special tokens by role, with ids, as this checkpoint's tokenizer defines them."""
    image_id = tokenizer.convert_tokens_to_ids(fmt.image_token)
    return {
        "file": B.TOKENIZER,
        "image_token_id": int(image_id),
        "vocab_size": len(tokenizer),
        "special_tokens": {
            "bos": token_entry(tokenizer, tokenizer.bos_token),
            "eos": token_entry(tokenizer, tokenizer.eos_token),
            "pad": token_entry(tokenizer, tokenizer.pad_token),
            "unk": token_entry(tokenizer, tokenizer.unk_token),
            "image": token_entry(tokenizer, fmt.image_token),
            "fake_image": token_entry(tokenizer, fmt.fake_image_token),
            "global_image": token_entry(tokenizer, fmt.global_image_token),
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


def model_section(checkpoint: Checkpoint) -> dict[str, Any]:
    return {
        "id": checkpoint.model_id,
        "revision": checkpoint.revision,
        "model_type": checkpoint.model_type,
        "family": checkpoint.family,
        "tiny": checkpoint.is_tiny,
        "note": "tiny random-weight model built offline: its answers are noise" if checkpoint.is_tiny else checkpoint.note,
    }


def embeddings_section(table: np.ndarray) -> dict[str, Any]:
    return {"file": B.EMBEDDINGS, "dtype": str(table.dtype), "shape": list(table.shape)}


def vision_section(report: dict[str, Any]) -> dict[str, Any]:
    """What the board needs to feed vision.rknn and what the build measured (host.vision_rknn's report)."""
    geometry = report["geometry"]  # host.vision_export.VisionGeometry's fields
    tile = int(geometry["tile"])
    tokens = tokens_per_tile(tile, int(geometry["patch"]), int(geometry["scale_factor"]))
    accuracy = report["accuracy"]
    return {
        "file": B.VISION_RKNN,
        "onnx": B.VISION_ONNX,
        "dtype": report["dtype"],
        "layout": report["layout"],
        "tile": tile,
        "tokens_per_tile": tokens,
        "input": {"shape": [1, tile, tile, 3], "dtype": "uint8", "format": "nhwc", "color": "rgb"},
        "output_shape": [1, tokens, int(geometry["text_hidden"])],
        "target_platform": report["target_platform"],
        "quantization": report.get("quantization"),
        "accuracy": {k: accuracy[k] for k in ("cosine_min", "cosine_mean", "threshold", "tiles")},
        "est_cycles_per_tile": report.get("ops", {}).get("est_cycles_per_tile"),
    }


def decoder_section(hf_config: dict[str, Any], *, max_context: int, rkllm: Optional[dict[str, Any]]) -> dict[str, Any]:
    """The decoder's shape (from the extracted folder's config.json) and, when built, how decoder.rkllm was made."""
    section: dict[str, Any] = {
        "file": B.DECODER_RKLLM if rkllm else None,
        "hf_folder": B.DECODER_HF,
        "hidden_size": int(hf_config["hidden_size"]),
        "vocab_size": int(hf_config["vocab_size"]),
        "num_hidden_layers": int(hf_config["num_hidden_layers"]),
        "max_context": int(max_context),
        "max_position_embeddings": int(hf_config["max_position_embeddings"]),
    }
    if rkllm:
        options = rkllm["options"]
        section.update(
            toolkit=rkllm.get("toolkit"),
            quantized_dtype=options["quantized_dtype"],
            quantized_algorithm=options["quantized_algorithm"],
            target_platform=options["target_platform"],
            num_npu_core=options["num_npu_core"],
            accuracy={k: v for k, v in (rkllm.get("accuracy") or {}).items() if k not in ("samples", "not_measured")},
        )
    else:
        section["missing"] = "converted with --skip-decoder: no decoder.rkllm (x86 emulation uses hf_folder)"
    return section


def video_section(checkpoint: Checkpoint) -> Optional[dict[str, Any]]:
    """SmolVLM2's video settings (board/video.py reads them): the checkpoint's video_sampling and the
    reference processor's prompt pieces. None for checkpoints without video (SmolVLM v1)."""
    sampling = checkpoint.preprocessor.get("video_sampling")
    if not sampling:
        return None
    from transformers.models.smolvlm import processing_smolvlm as ref

    return {
        "fps": sampling["fps"],
        "max_frames": sampling["max_frames"],
        "video_size": sampling["video_size"],
        "intro": ref.DEFAULT_VIDEO_INTRO,
        "frame_timestamp": ref.FRAME_TIMESTAMP_MESSAGE,
        "outro": ref.DEFAULT_MEDIA_OUTTRO,
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
    extra_files: tuple[str, ...] = (),
) -> dict[str, Any]:
    """Checksum every file of the bundle and write manifest.json (atomically, last: a bundle without a
    manifest is visibly unfinished)."""
    root = Path(root)
    board_files = [B.VISION_RKNN, B.EMBEDDINGS, B.TOKENIZER]
    if decoder.get("file"):
        board_files.append(B.DECODER_RKLLM)
    host_files = [rel for rel in (B.VISION_ONNX, B.DECODER_HF, *extra_files) if (root / rel).exists()]
    missing = [rel for rel in board_files if not (root / rel).is_file()]
    if missing:
        raise FileNotFoundError(f"cannot write the manifest: missing {', '.join(missing)} in {root}")
    manifest = {
        B.K_FORMAT: B.FORMAT_NAME,
        B.K_VERSION: B.FORMAT_VERSION,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        B.K_MODEL: model_section(checkpoint),
        B.K_TARGET: {"platform": "rk3588", "npu_driver_min": "0.9.8", "librkllmrt": "1.3.0"},
        B.K_TOOLKITS: toolkit_versions(),
        B.K_VISION: vision,
        B.K_DECODER: decoder,
        B.K_EMBEDDINGS: embeddings,
        B.K_TOKENIZER: tokenizer_info,
        B.K_PROMPT: prompt_format.to_dict(),
        B.K_PREPROCESSOR: checkpoint.preprocessor,
        B.K_GENERATION: generation,
        B.K_FILES: B.file_entries(root, board_files + host_files),
    }
    if video:
        manifest[B.K_VIDEO] = video
    tmp = root / (B.MANIFEST + ".tmp")
    tmp.write_text(json.dumps(manifest, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    os.replace(tmp, root / B.MANIFEST)
    return manifest
