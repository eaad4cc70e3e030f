"""The bundle: the one folder that travels from the host to the board, and its single reader.

Layout (every name is in board/bundle_schema.py; host/bundle_writer.py writes with the same names):

    manifest.json        what the bundle is, settings the board follows, sha256 of every file
    vision.rknn          SigLIP tower + connector for rk3588 (uint8 NHWC tile in, [1, N, hidden] out)
    decoder.rkllm        SmolLM2 decoder for librkllmrt (absent when converted with --skip-decoder)
    embed_tokens.npy     the text embedding table, float16 [vocab, hidden], memory-mapped on the board
    tokenizer.json       the tokenizer (tokenizers library format)
    reference.npz        the board doctor's reference tile and its full-precision vision rows
    vision_conv.rknn     (opt-in, --vision-fallback) the fp16 vision model in Rockchip's conv layout
    host/                what only x86 emulation needs (vision.onnx, the extracted decoder folder)
                         and the conversion reports; it need not be copied to the board

The board refuses a bundle whose format version, target (SoC, librkllmrt ABI), settings, files or
checksums do not match, naming the manifest key at fault and saying what to do. Every file it opens
stays inside the bundle folder: no absolute path, no `..`, no symlink that leads out.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any, Iterable, Optional

import numpy as np

from . import bundle_schema as S
from .bundle_schema import (  # noqa: F401 (the file names are read through this module too)
    DECODER_HF,
    DECODER_RKLLM,
    EMBEDDINGS,
    FORMAT_NAME,
    FORMAT_VERSION,
    HOST_DIR,
    MANIFEST,
    REBUILD_HINT,
    REFERENCE,
    TOKENIZER,
    VISION_FALLBACK_ONNX,
    VISION_FALLBACK_RKNN,
    VISION_ONNX,
    VISION_RKNN,
)
from .errors import BundleError
from .prompt import PromptFormat
from .rkllm_h import RKLLM_VERSION
from .system_checks import (
    MIN_NPU_DRIVER,
    PLATFORM,
    CheckResult,
    SystemPaths,
    check_npu_driver,
    check_soc,
    parse_version,
)
from .tiles import SplitSettings, tokens_per_tile
from .vision import VisionModel, vision_model

M, T, F = S.Manifest, S.Target, S.FileEntry
_COPY_HINT = "copy the bundle folder again (a file was changed, truncated or left out), or " + REBUILD_HINT
_LINK_HINT = "copy the file itself into the bundle folder (a symlink must stay inside it), or " + REBUILD_HINT


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
            entries[f.relative_to(root).as_posix()] = {F.SHA256: sha256_file(f), F.BYTES: f.stat().st_size}
    return entries


def runtime_target() -> dict[str, str]:
    """The target section this software writes into every bundle and requires of one: the SoC, the NPU
    driver minimum board.system_checks checks, and the librkllmrt ABI board.rkllm_h binds."""
    return {T.PLATFORM: PLATFORM, T.NPU_DRIVER_MIN: ".".join(map(str, MIN_NPU_DRIVER)), T.LIBRKLLMRT: RKLLM_VERSION}


def _inside(root: Path, rel: str, where: Optional[str] = None) -> Path:
    """root / rel, refused unless it stays inside the bundle folder once symlinks are resolved;
    `where` is the manifest key that names the path, if one does."""
    at = f"{where}: " if where else ""
    problem = S.path_problem(rel)
    if problem:
        raise BundleError(f"{at}the path {rel!r} {problem}; every file must be inside the bundle", hint=REBUILD_HINT)
    path = root / rel
    real = path.resolve()
    if not real.is_relative_to(root.resolve()):
        raise BundleError(f"{at}{rel} leads to {real}, outside the bundle folder (a symlink)", hint=_LINK_HINT)
    return path


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
            raise BundleError(f"bundle folder not found: {root}", hint=REBUILD_HINT)
        manifest_path = root / MANIFEST
        if not manifest_path.exists():
            raise BundleError(f"{root} has no {MANIFEST}: not a bundle", hint=REBUILD_HINT)
        try:
            manifest = json.loads(_inside(root, MANIFEST).read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise BundleError(f"{manifest_path} is corrupt: {exc}", hint=_COPY_HINT) from exc
        if not isinstance(manifest, dict) or manifest.get(M.FORMAT) != FORMAT_NAME:
            raise BundleError(f"{manifest_path} is not a {FORMAT_NAME} manifest", hint=REBUILD_HINT)
        S.validate(manifest, only=[M.VERSION])  # an integer; the rest of the schema is this version's
        version = manifest[M.VERSION]
        if version != FORMAT_VERSION:
            raise BundleError(
                f"the bundle has format version {version}; this runtime reads version {FORMAT_VERSION}",
                hint="update this software on the board, or " + REBUILD_HINT if version > FORMAT_VERSION
                else REBUILD_HINT,
            )
        S.validate(manifest)
        bundle = cls(root, manifest)
        bundle.check_target()
        for rel in manifest[M.FILES]:
            _inside(root, rel, f"manifest.{M.FILES}[{json.dumps(rel)}]")
        if need_decoder and not bundle.has_decoder:
            raise BundleError(
                f"{root} has no {DECODER_RKLLM} (it was converted with --skip-decoder)",
                hint=f"install rkllm-toolkit {RKLLM_VERSION} on the host and convert again without --skip-decoder, "
                "or run on x86 with --emulate",
            )
        if verify:
            bundle.verify(bundle.board_files())
        bundle.check_consistency()
        return bundle

    def check_target(self) -> None:
        """The bundle is built for the SoC and the librkllmrt ABI this software runs (check_board: the board)."""
        target, runtime = self.manifest[M.TARGET], runtime_target()
        where = f"manifest.{M.TARGET}"
        for key, what, converter in ((T.PLATFORM, "the SoC", f"it builds for {PLATFORM}"),
                                     (T.LIBRKLLMRT, "the librkllmrt ABI", f"rkllm-toolkit {RKLLM_VERSION}")):
            if target[key] != runtime[key]:
                raise BundleError(
                    f"the bundle is built for {what} {target[key]} ({where}.{key}); this software runs {runtime[key]}",
                    hint=f"convert the checkpoint again with this software's host.convert ({converter}), or run the "
                    "bundle with the version of this software that made it",
                )
        if parse_version(target[T.NPU_DRIVER_MIN]) is None:
            raise BundleError(
                f"{where}.{T.NPU_DRIVER_MIN} = {target[T.NPU_DRIVER_MIN]!r} is not a version like 0.9.8",
                hint=REBUILD_HINT,
            )

    def check_board(self, paths: SystemPaths = SystemPaths()) -> list[CheckResult]:
        """The target's board half: this board is the SoC (check_target made sure the bundle's platform is
        the one check_soc knows) and its NPU driver is at least the bundle's minimum. Not for emulation."""
        minimum = parse_version(self.manifest[M.TARGET][T.NPU_DRIVER_MIN])
        return [check_soc(paths), check_npu_driver(paths, minimum=minimum, needed_by="this bundle")]

    def check_consistency(self) -> None:
        """The settings agree with each other and with the embedding table's header (cheap: no data read).

        A checksum only proves a file is the one the manifest names, and the schema only the type of
        each value; this catches a manifest whose numbers disagree (hand-edited, or written by a broken
        converter) before the board feeds a wrongly shaped sequence to the NPU runtime.
        """
        m = self.manifest
        hidden = m[M.DECODER][S.Decoder.HIDDEN_SIZE]
        spec_shape, spec_dtype = m[M.EMBEDDINGS][S.Embeddings.SHAPE], m[M.EMBEDDINGS][S.Embeddings.DTYPE]
        image_id = m[M.TOKENIZER][S.Tokenizer.IMAGE_TOKEN_ID]
        eos_ids = m[M.GENERATION][S.Generation.EOS_TOKEN_IDS]
        if len(spec_shape) != 2 or spec_shape[1] != hidden or spec_dtype != "float16":
            raise BundleError(
                f"the manifest's embedding table is {spec_dtype} {spec_shape}, but the decoder needs "
                f"float16 [vocab, {hidden}]",
                hint=REBUILD_HINT,
            )
        vocab = spec_shape[0]
        bad = [t for t in [image_id, *eos_ids] if not 0 <= t < vocab]
        if bad or not eos_ids:
            raise BundleError(
                f"the manifest's token ids {bad or eos_ids} do not fit the {vocab}-row embedding table"
                + ("" if eos_ids else " (no end-of-answer id)"),
                hint=REBUILD_HINT,
            )
        self.embeddings()  # its header against the manifest
        fmt = self.prompt_format  # complete, or a BundleError
        try:
            tile = self.split_settings.tile
        except BundleError as exc:
            raise BundleError(f"the manifest's preprocessor settings are unusable: {exc.message}",
                              hint=REBUILD_HINT) from exc
        self._check_tile_tokens(fmt.image_seq_len, tile)

    def _check_tile_tokens(self, image_seq_len: int, tile: int) -> None:
        """One tile: the same size for the splitter and the vision model, and as many image tokens in the
        prompt as rows out of the vision model (board.tiles.tokens_per_tile, when the patch grid is known)."""
        V, vision, where = S.Vision, self.manifest[M.VISION], f"manifest.{M.VISION}"
        tokens = vision[V.TOKENS_PER_TILE]
        if vision[V.TILE] != tile:
            raise BundleError(
                f"{where}.{V.TILE} is {vision[V.TILE]}, but the preprocessor splits {tile}px tiles "
                f"(manifest.{M.PREPROCESSOR})", hint=REBUILD_HINT)
        if tokens != image_seq_len:
            raise BundleError(
                f"{where}.{V.TOKENS_PER_TILE} is {tokens}, but manifest.{M.PROMPT}.{S.Prompt.IMAGE_SEQ_LEN} "
                f"is {image_seq_len}: the prompt would not hold one image token per vision row", hint=REBUILD_HINT)
        if V.PATCH in vision and V.SCALE_FACTOR in vision:
            try:
                derived = tokens_per_tile(tile, vision[V.PATCH], vision[V.SCALE_FACTOR])
            except BundleError as exc:
                raise BundleError(f"{where}: {exc.message}", hint=REBUILD_HINT) from exc
            if derived != tokens:
                raise BundleError(
                    f"{where}.{V.TOKENS_PER_TILE} is {tokens}, but a {tile}px tile in {vision[V.PATCH]}px patches "
                    f"merged {vision[V.SCALE_FACTOR]}x{vision[V.SCALE_FACTOR]} gives {derived}", hint=REBUILD_HINT)

    def board_files(self) -> list[str]:
        """The files the board needs (everything outside host/)."""
        return [rel for rel in self.manifest[M.FILES] if not rel.startswith(HOST_DIR + "/")]

    def verify(self, relpaths: Iterable[str]) -> None:
        """Check presence, size and sha256 of the listed files against the manifest."""
        files = self.manifest[M.FILES]
        for rel in relpaths:
            entry = files.get(rel)
            if entry is None:
                raise BundleError(f"{rel} is not listed in the bundle manifest", hint=REBUILD_HINT)
            path = self.path(rel)
            if not path.is_file():
                raise BundleError(f"the bundle is missing {rel}", hint=_COPY_HINT)
            if path.stat().st_size != entry[F.BYTES] or sha256_file(path) != entry[F.SHA256]:
                raise BundleError(f"{rel} does not match its checksum in the manifest", hint=_COPY_HINT)

    def verify_host_files(self, prefix: str) -> Path:
        """Check the host/ files under `prefix` (e.g. the ONNX model) before emulation uses them."""
        rels = [rel for rel in self.manifest[M.FILES] if rel == prefix or rel.startswith(prefix + "/")]
        if not rels:
            raise BundleError(
                f"the bundle has no {prefix}; emulation needs the host/ folder that host.convert writes",
                hint="run --emulate on the machine that converted the bundle, or copy its host/ folder too",
            )
        self.verify(rels)
        return self.path(prefix)

    # -- settings -------------------------------------------------------------------------------
    @property
    def model_id(self) -> str:
        return self.manifest[M.MODEL][S.Model.ID]

    @property
    def is_tiny(self) -> bool:
        return bool(self.manifest[M.MODEL].get(S.Model.TINY))

    @property
    def has_decoder(self) -> bool:
        return bool(self.manifest[M.DECODER].get(S.Decoder.FILE)) and DECODER_RKLLM in self.manifest[M.FILES]

    @cached_property
    def split_settings(self) -> SplitSettings:
        return SplitSettings.from_preprocessor(self.manifest[M.PREPROCESSOR])

    @cached_property
    def prompt_format(self) -> PromptFormat:
        section = self.manifest[M.PROMPT]  # its known keys: the section may grow within a format version
        try:
            return PromptFormat.from_dict({k: section[k] for k in S.keys(S.Prompt)})
        except (IndexError, KeyError, TypeError, ValueError) as exc:
            raise BundleError(f"the manifest's prompt format is incomplete: {exc}", hint=REBUILD_HINT) from exc

    @property
    def image_token_id(self) -> int:
        return int(self.manifest[M.TOKENIZER][S.Tokenizer.IMAGE_TOKEN_ID])

    @property
    def eos_token_ids(self) -> list[int]:
        return [int(t) for t in self.manifest[M.GENERATION][S.Generation.EOS_TOKEN_IDS]]

    @property
    def hidden_size(self) -> int:
        return int(self.manifest[M.DECODER][S.Decoder.HIDDEN_SIZE])

    @property
    def max_context(self) -> int:
        return int(self.manifest[M.DECODER][S.Decoder.MAX_CONTEXT])

    @property
    def vision(self) -> dict[str, Any]:
        return self.manifest[M.VISION]

    @property
    def vision_layout(self) -> str:
        return self.manifest[M.VISION].get(S.Vision.LAYOUT, "conv")

    @property
    def video(self) -> Optional[dict[str, Any]]:
        return self.manifest.get(M.VIDEO)

    def vision_model(self, fallback: bool = False) -> VisionModel:
        """The vision model a runtime opens: the main one, or the opt-in conv fallback (a BundleError if absent)."""
        return vision_model(self.vision, fallback)

    @property
    def embed_flash(self) -> bool:
        """The bundle's default for librkllmrt's embed_flash (word embeddings read from flash, saving RAM)."""
        return bool(self.manifest[M.DECODER].get(S.Decoder.EMBED_FLASH, False))

    @property
    def built_with(self) -> dict[str, Any]:
        """The toolkit versions that made the bundle (manifest.toolkits; empty when not recorded)."""
        return dict(self.manifest.get(M.TOOLKITS) or {})

    @property
    def reference(self) -> Optional[dict[str, Any]]:
        """The board doctor's reference (manifest.reference), or None for a bundle converted without one."""
        return self.manifest.get(M.REFERENCE)

    def reference_arrays(self) -> tuple[np.ndarray, np.ndarray]:
        """The reference tile (uint8 [T, T, 3]) and its full-precision vision rows (float32 [N, hidden])."""
        section = self.reference
        if section is None:
            raise BundleError("this bundle has no reference data for the board doctor",
                              hint="convert it again with this version's host.convert")
        path = self.path(section[S.Reference.FILE])
        try:
            with np.load(path) as data:
                tile, rows = data[S.REFERENCE_TILE], data[S.REFERENCE_ROWS]
        except (OSError, KeyError, ValueError) as exc:
            raise BundleError(f"{section[S.Reference.FILE]} cannot be read: {exc}", hint=_COPY_HINT) from exc
        tile_px, tokens = self.split_settings.tile, self.prompt_format.image_seq_len
        if tile.shape != (tile_px, tile_px, 3) or tile.dtype != np.uint8 or rows.shape != (tokens, self.hidden_size):
            raise BundleError(
                f"{section[S.Reference.FILE]} holds a {tile.dtype} {list(tile.shape)} tile and {list(rows.shape)} rows; "
                f"the bundle needs uint8 [{tile_px}, {tile_px}, 3] and [{tokens}, {self.hidden_size}]", hint=REBUILD_HINT)
        return tile, rows.astype(np.float32)

    # -- files ----------------------------------------------------------------------------------
    def path(self, rel: str) -> Path:
        """root / rel, refused if it would lead out of the bundle folder."""
        return _inside(self.root, rel)

    def tokenizer(self):
        """The tokenizers.Tokenizer the prompt builder uses."""
        from tokenizers import Tokenizer

        path = self.path(TOKENIZER)
        try:
            return Tokenizer.from_file(str(path))
        except Exception as exc:  # the Rust error type is not importable
            raise BundleError(f"{TOKENIZER} cannot be loaded: {exc}", hint=_COPY_HINT) from exc

    def embeddings(self) -> np.ndarray:
        """The embedding table, memory-mapped (read-only): only the rows a prompt uses are paged in."""
        spec = self.manifest[M.EMBEDDINGS]
        shape, dtype = list(spec[S.Embeddings.SHAPE]), spec[S.Embeddings.DTYPE]
        path = self.path(EMBEDDINGS)
        try:
            table = np.load(path, mmap_mode="r")
        except (OSError, ValueError) as exc:
            raise BundleError(f"{EMBEDDINGS} cannot be read: {exc}", hint=_COPY_HINT) from exc
        if list(table.shape) != shape or str(table.dtype) != dtype:
            raise BundleError(
                f"{EMBEDDINGS} is {table.dtype} {list(table.shape)}, the manifest says {dtype} {shape}",
                hint=_COPY_HINT,
            )
        return table
