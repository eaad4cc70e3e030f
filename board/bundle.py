"""The bundle: the one folder that travels from the host to the board, and its single reader.

Layout (every name is a constant here; host/bundle_writer.py writes with the same names):

    manifest.json        what the bundle is, settings the board follows, sha256 of every file
    vision.rknn          SigLIP tower + connector for rk3588 (uint8 NHWC tile in, [1, N, hidden] out)
    decoder.rkllm        SmolLM2 decoder for librkllmrt (absent when converted with --skip-decoder)
    embed_tokens.npy     the text embedding table, float16 [vocab, hidden], memory-mapped on the board
    tokenizer.json       the tokenizer (tokenizers library format)
    host/                what only x86 emulation needs (vision.onnx, the extracted decoder folder)
                         and the conversion reports; it need not be copied to the board

The board refuses a bundle whose format version, files or checksums do not match, and says what to do.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any, Iterable, Optional

import numpy as np

from .errors import BundleError
from .prompt import PromptFormat
from .tiles import SplitSettings

FORMAT_NAME = "smolvlm-rk3588-bundle"
FORMAT_VERSION = 1

MANIFEST = "manifest.json"
VISION_RKNN = "vision.rknn"
DECODER_RKLLM = "decoder.rkllm"
EMBEDDINGS = "embed_tokens.npy"
TOKENIZER = "tokenizer.json"
HOST_DIR = "host"
VISION_ONNX = "host/vision.onnx"
DECODER_HF = "host/decoder"  # a folder: the standalone Llama-format text model

# manifest keys (top level)
K_FORMAT, K_VERSION, K_MODEL, K_VISION, K_DECODER = "format", "format_version", "model", "vision", "decoder"
K_EMBEDDINGS, K_TOKENIZER, K_PROMPT, K_PREPROCESSOR = "embeddings", "tokenizer", "prompt_format", "preprocessor"
K_GENERATION, K_TOOLKITS, K_TARGET, K_FILES, K_VIDEO = "generation", "toolkits", "target", "files", "video"

_REBUILD_HINT = "re-create it with `python -m host.convert --model <checkpoint> --out <dir>` on the host"
_COPY_HINT = "copy the bundle folder again (a file was changed, truncated or left out), or " + _REBUILD_HINT


def sha256_file(path: Path, chunk: int = 4 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def file_entries(root: Path, relpaths: Iterable[str]) -> dict[str, dict[str, Any]]:
    """sha256 and size of each file; a folder stands for every file below it."""
    entries: dict[str, dict[str, Any]] = {}
    for rel in relpaths:
        path = root / rel
        files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
        for f in files:
            entries[f.relative_to(root).as_posix()] = {"sha256": sha256_file(f), "bytes": f.stat().st_size}
    return entries


@dataclass
class Bundle:
    """A validated bundle folder. Open with Bundle.open(); everything else is read from the manifest."""

    root: Path
    manifest: dict[str, Any]

    @classmethod
    def open(cls, path: str | Path, *, verify: bool = True, need_decoder: bool = False) -> "Bundle":
        """Read and check a bundle; `verify` hashes the board files (host/ files are checked when used)."""
        root = Path(path).expanduser()
        if not root.is_dir():
            raise BundleError(f"bundle folder not found: {root}", hint=_REBUILD_HINT)
        manifest_path = root / MANIFEST
        if not manifest_path.exists():
            raise BundleError(f"{root} has no {MANIFEST}: not a bundle", hint=_REBUILD_HINT)
        try:
            manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise BundleError(f"{manifest_path} is corrupt: {exc}", hint=_COPY_HINT) from exc
        if not isinstance(manifest, dict) or manifest.get(K_FORMAT) != FORMAT_NAME:
            raise BundleError(f"{manifest_path} is not a {FORMAT_NAME} manifest", hint=_REBUILD_HINT)
        version = manifest.get(K_VERSION)
        if version != FORMAT_VERSION:
            raise BundleError(
                f"the bundle has format version {version}; this runtime reads version {FORMAT_VERSION}",
                hint="update this software on the board, or " + _REBUILD_HINT
                if isinstance(version, int) and version > FORMAT_VERSION
                else _REBUILD_HINT,
            )
        for key in (K_MODEL, K_VISION, K_DECODER, K_EMBEDDINGS, K_TOKENIZER, K_PROMPT, K_PREPROCESSOR, K_FILES):
            if key not in manifest:
                raise BundleError(f"{manifest_path} lacks '{key}'", hint=_REBUILD_HINT)
        bundle = cls(root, manifest)
        if need_decoder and not bundle.has_decoder:
            raise BundleError(
                f"{root} has no {DECODER_RKLLM} (it was converted with --skip-decoder)",
                hint="install rkllm-toolkit 1.3.0 on the host and convert again without --skip-decoder, "
                "or run on x86 with --emulate",
            )
        if verify:
            bundle.verify(bundle.board_files())
        bundle.check_consistency()
        return bundle

    def check_consistency(self) -> None:
        """The settings agree with each other and with the embedding table's header (cheap: no data read).

        A checksum only proves a file is the one the manifest names; this catches a manifest whose
        numbers disagree (hand-edited, or written by a broken converter) before the board feeds a
        wrongly shaped sequence to the NPU runtime.
        """
        m = self.manifest
        try:
            hidden = int(m[K_DECODER]["hidden_size"])
            int(m[K_DECODER]["max_context"])
            spec_shape = [int(v) for v in m[K_EMBEDDINGS]["shape"]]
            spec_dtype = str(m[K_EMBEDDINGS]["dtype"])
            image_id = int(m[K_TOKENIZER]["image_token_id"])
            eos_ids = [int(t) for t in m[K_GENERATION]["eos_token_ids"]]
        except (KeyError, TypeError, ValueError) as exc:
            raise BundleError(f"the manifest lacks or garbles a setting: {exc!r}", hint=_REBUILD_HINT) from exc
        if len(spec_shape) != 2 or spec_shape[1] != hidden or spec_dtype != "float16":
            raise BundleError(
                f"the manifest's embedding table is {spec_dtype} {spec_shape}, but the decoder needs "
                f"float16 [vocab, {hidden}]",
                hint=_REBUILD_HINT,
            )
        vocab = spec_shape[0]
        bad = [t for t in [image_id, *eos_ids] if not 0 <= t < vocab]
        if bad or not eos_ids:
            raise BundleError(
                f"the manifest's token ids {bad or eos_ids} do not fit the {vocab}-row embedding table"
                + ("" if eos_ids else " (no end-of-answer id)"),
                hint=_REBUILD_HINT,
            )
        self.embeddings()  # its header against the manifest
        self.prompt_format  # complete, or a BundleError
        try:
            self.split_settings
        except BundleError as exc:
            raise BundleError(f"the manifest's preprocessor settings are unusable: {exc.message}",
                              hint=_REBUILD_HINT) from exc


    def board_files(self) -> list[str]:
        """The files the board needs (everything outside host/)."""
        return [rel for rel in self.manifest[K_FILES] if not rel.startswith(HOST_DIR + "/")]

    def verify(self, relpaths: Iterable[str]) -> None:
        """Check presence, size and sha256 of the listed files against the manifest."""
        files = self.manifest[K_FILES]
        for rel in relpaths:
            entry = files.get(rel)
            if entry is None:
                raise BundleError(f"{rel} is not listed in the bundle manifest", hint=_REBUILD_HINT)
            path = self.root / rel
            if not path.is_file():
                raise BundleError(f"the bundle is missing {rel}", hint=_COPY_HINT)
            if path.stat().st_size != entry["bytes"] or sha256_file(path) != entry["sha256"]:
                raise BundleError(f"{rel} does not match its checksum in the manifest", hint=_COPY_HINT)

    def verify_host_files(self, prefix: str) -> Path:
        """Check the host/ files under `prefix` (e.g. the ONNX model) before emulation uses them."""
        rels = [rel for rel in self.manifest[K_FILES] if rel == prefix or rel.startswith(prefix + "/")]
        if not rels:
            raise BundleError(
                f"the bundle has no {prefix}; emulation needs the host/ folder that host.convert writes",
                hint="run --emulate on the machine that converted the bundle, or copy its host/ folder too",
            )
        self.verify(rels)
        return self.root / prefix

    # -- settings -------------------------------------------------------------------------------
    @property
    def model_id(self) -> str:
        return self.manifest[K_MODEL].get("id", "?")

    @property
    def is_tiny(self) -> bool:
        return bool(self.manifest[K_MODEL].get("tiny"))

    @property
    def has_decoder(self) -> bool:
        return bool(self.manifest[K_DECODER].get("file")) and DECODER_RKLLM in self.manifest[K_FILES]

    @cached_property
    def split_settings(self) -> SplitSettings:
        return SplitSettings.from_preprocessor(self.manifest[K_PREPROCESSOR])

    @cached_property
    def prompt_format(self) -> PromptFormat:
        try:
            return PromptFormat.from_dict(self.manifest[K_PROMPT])
        except (KeyError, TypeError, ValueError) as exc:
            raise BundleError(f"the manifest's prompt format is incomplete: {exc}", hint=_REBUILD_HINT) from exc

    @property
    def image_token_id(self) -> int:
        return int(self.manifest[K_TOKENIZER]["image_token_id"])

    @property
    def eos_token_ids(self) -> list[int]:
        return [int(t) for t in self.manifest[K_GENERATION]["eos_token_ids"]]

    @property
    def hidden_size(self) -> int:
        return int(self.manifest[K_DECODER]["hidden_size"])

    @property
    def max_context(self) -> int:
        return int(self.manifest[K_DECODER]["max_context"])

    @property
    def vision(self) -> dict[str, Any]:
        return self.manifest[K_VISION]

    @property
    def vision_layout(self) -> str:
        return self.manifest[K_VISION].get("layout", "conv")

    @property
    def video(self) -> Optional[dict[str, Any]]:
        return self.manifest.get(K_VIDEO)

    # -- files ----------------------------------------------------------------------------------
    def path(self, rel: str) -> Path:
        return self.root / rel

    def tokenizer(self):
        """The tokenizers.Tokenizer the prompt builder uses."""
        from tokenizers import Tokenizer

        try:
            return Tokenizer.from_file(str(self.root / TOKENIZER))
        except Exception as exc:  # the Rust error type is not importable
            raise BundleError(f"{TOKENIZER} cannot be loaded: {exc}", hint=_COPY_HINT) from exc

    def embeddings(self) -> np.ndarray:
        """The embedding table, memory-mapped (read-only): only the rows a prompt uses are paged in."""
        spec = self.manifest[K_EMBEDDINGS]
        try:
            table = np.load(self.root / EMBEDDINGS, mmap_mode="r")
        except (OSError, ValueError) as exc:
            raise BundleError(f"{EMBEDDINGS} cannot be read: {exc}", hint=_COPY_HINT) from exc
        if list(table.shape) != list(spec["shape"]) or str(table.dtype) != spec["dtype"]:
            raise BundleError(
                f"{EMBEDDINGS} is {table.dtype} {list(table.shape)}, the manifest says {spec['dtype']} {spec['shape']}",
                hint=_COPY_HINT,
            )
        return table
