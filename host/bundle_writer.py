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


def eos_token_ids(checkpoint: Checkpoint, tokenizer) -> list[int]:
    """End-of-turn ids: the generation config's (SmolVLM: <end_of_utterance>), else the tokenizer's eos.

    A wrong EOS is a known cause of never-ending answers on boards, so both sources are merged.
    """
    ids: list[int] = []
    gen_path = checkpoint.path / "generation_config.json"
    if gen_path.exists():
        eos = json.loads(gen_path.read_text()).get("eos_token_id")
        ids.extend([eos] if isinstance(eos, int) else list(eos or []))
    if tokenizer.eos_token_id is not None:
        ids.append(int(tokenizer.eos_token_id))
    return sorted(set(int(i) for i in ids))


def model_section(checkpoint: Checkpoint) -> dict[str, Any]:
    return {
        "id": checkpoint.model_id,
        "revision": checkpoint.revision,
        "model_type": checkpoint.model_type,
        "family": checkpoint.family,
        "tiny": checkpoint.is_tiny,
        "note": "tiny random-weight model built offline: its answers are noise" if checkpoint.is_tiny else None,
    }


def embeddings_section(table: np.ndarray) -> dict[str, Any]:
    return {"file": B.EMBEDDINGS, "dtype": str(table.dtype), "shape": list(table.shape)}


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
