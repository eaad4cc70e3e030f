"""Find and read a SmolVLM checkpoint: a Hugging Face id (downloaded once) or a local folder.

Every host stage starts here, so the settings the board will follow (splitting, image_seq_len, chat
template, special tokens) are read from the checkpoint's own files in one place, never typed in code.
Both file layouts are read: the Hub's (flat preprocessor_config.json + processor_config.json with
image_seq_len) and transformers 5's (one processor_config.json with a nested image_processor).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from board.errors import InputError, RuntimeUnavailable
from board.tiles import tokens_per_tile

DEFAULT_MODEL = "HuggingFaceTB/SmolVLM-256M-Instruct"
DEMO_MARKER = "demo_model.json"  # written by host.demo_model; carries the label of what its answers mean
TINY_MARKER = "tiny_model.json"  # written by host.tiny_model; carries the same kind of label

# Files a conversion needs; weights and tokenizer/processor settings, nothing else from the repo.
_HUB_PATTERNS = ["*.json", "*.safetensors", "*.jinja", "*.txt", "*.model"]


@dataclass
class Checkpoint:
    """A SmolVLM checkpoint folder and the settings read from it."""

    path: Path
    model_id: str
    revision: str | None
    config: dict[str, Any]
    preprocessor: dict[str, Any]
    image_seq_len: int
    chat_template: str
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def model_type(self) -> str:
        return self.config.get("model_type", "")

    @property
    def vision_config(self) -> dict[str, Any]:
        return self.config["vision_config"]

    @property
    def text_config(self) -> dict[str, Any]:
        return self.config["text_config"]

    @property
    def scale_factor(self) -> int:
        return int(self.config.get("scale_factor", 2))

    @property
    def tile_size(self) -> int:
        return int(self.vision_config["image_size"])

    @property
    def patch_size(self) -> int:
        return int(self.vision_config["patch_size"])

    @property
    def is_tiny(self) -> bool:
        """True for the random-weight models host.tiny_model builds (their answers are noise)."""
        return (self.path / TINY_MARKER).exists()

    @property
    def note(self) -> str | None:
        """What the answers of a model built here mean (the label host.demo_model or host.tiny_model wrote),
        or None for a published one."""
        for marker in (self.path / DEMO_MARKER, self.path / TINY_MARKER):
            if marker.exists():
                return _read_json(marker).get("note")
        return None

    @property
    def family(self) -> str:
        """A label for the geometry: '512/16x4' style, plus the SmolVLM name when it matches one."""
        geometry = f"{self.tile_size}/{self.patch_size}x{self.scale_factor}"
        names = {"512/16x4": "siglip-b16-512", "384/14x3": "siglip-so400m-384"}
        return names.get(geometry, geometry)

    def load_model(self, dtype: str = "float32"):
        """The full transformers model (vision tower, connector, text model), in eval mode on the CPU."""
        import torch
        from transformers import AutoModelForImageTextToText

        model = AutoModelForImageTextToText.from_pretrained(self.path, dtype=getattr(torch, dtype))
        return model.eval()

    def load_tokenizer(self):
        """The transformers tokenizer with the checkpoint's special tokens."""
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(self.path)

    def load_processor(self):
        """The reference processor (PIL image backend; torchvision is not needed)."""
        from transformers import AutoProcessor

        return AutoProcessor.from_pretrained(self.path)


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise InputError(f"{path} is not valid JSON: {exc}") from exc


def _download(model_id: str, revision: str | None) -> tuple[Path, str | None]:
    try:
        from huggingface_hub import snapshot_download
    except ImportError as exc:  # pragma: no cover - host extra always has it
        raise RuntimeUnavailable(
            "huggingface_hub is not installed", hint="run scripts/setup.sh (installs the host extra)"
        ) from exc
    try:
        local = snapshot_download(model_id, revision=revision, allow_patterns=_HUB_PATTERNS)
    except Exception as exc:  # network, auth, unknown repo: all need the same words
        raise InputError(
            f"could not get '{model_id}' from the Hugging Face Hub: {type(exc).__name__}: {exc}",
            hint="check the model id and the network, or pass a local checkpoint folder with --model",
        ) from exc
    path = Path(local)
    # snapshot folders are named after the commit they hold
    return path, path.name if path.parent.name == "snapshots" else revision


def _chat_template(path: Path, processor_cfg: dict[str, Any]) -> str:
    if (path / "chat_template.jinja").exists():
        return (path / "chat_template.jinja").read_text(encoding="utf-8")
    if (path / "chat_template.json").exists():
        return _read_json(path / "chat_template.json")["chat_template"]
    if "chat_template" in processor_cfg:
        return processor_cfg["chat_template"]
    tok_cfg = path / "tokenizer_config.json"
    if tok_cfg.exists() and isinstance(_read_json(tok_cfg).get("chat_template"), str):
        return _read_json(tok_cfg)["chat_template"]
    raise InputError(f"{path} has no chat template (chat_template.json / .jinja / tokenizer_config.json)")


def load_checkpoint(model: str | Path = DEFAULT_MODEL, revision: str | None = None) -> Checkpoint:
    """Resolve a Hugging Face id or a local folder to a Checkpoint with its settings read."""
    local = Path(model).expanduser()
    if local.is_dir():
        path, model_id = local.resolve(), str(model)
    elif local.exists() or str(model).startswith((".", "/", "~")):
        raise InputError(f"{model} is not a checkpoint folder")
    else:
        path, revision = _download(str(model), revision)
        model_id = str(model)

    if not (path / "config.json").exists():
        raise InputError(f"{path} has no config.json: not a transformers checkpoint")
    config = _read_json(path / "config.json")
    if config.get("model_type") not in ("idefics3", "smolvlm"):
        raise InputError(
            f"{model_id} is a '{config.get('model_type')}' model, not SmolVLM",
            hint="pass a SmolVLM / SmolVLM2 checkpoint (model_type idefics3 or smolvlm)",
        )

    processor_cfg = _read_json(path / "processor_config.json") if (path / "processor_config.json").exists() else {}
    if (path / "preprocessor_config.json").exists():
        preprocessor = _read_json(path / "preprocessor_config.json")
    elif "image_processor" in processor_cfg:
        preprocessor = dict(processor_cfg["image_processor"])
    else:
        raise InputError(f"{path} has no image processor settings (preprocessor_config.json)")

    vision = config["vision_config"]
    derived_seq_len = tokens_per_tile(int(vision["image_size"]), int(vision["patch_size"]), int(config.get("scale_factor", 2)))
    image_seq_len = int(processor_cfg.get("image_seq_len", derived_seq_len))
    if image_seq_len != derived_seq_len:
        raise InputError(
            f"{model_id}: processor image_seq_len {image_seq_len} does not match the vision geometry "
            f"({vision['image_size']}/{vision['patch_size']}, scale {config.get('scale_factor')}) = {derived_seq_len}"
        )
    return Checkpoint(
        path=path,
        model_id=model_id,
        revision=revision,
        config=config,
        preprocessor=preprocessor,
        image_seq_len=image_seq_len,
        chat_template=_chat_template(path, processor_cfg),
        extra={"processor_config": processor_cfg},
    )
