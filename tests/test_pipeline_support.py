"""Tiny bundles for the pipeline tests, built once per session, and the transformers oracle beside them.

Until host.convert lands, a bundle is assembled here from the same host pieces it will use: the tiny
checkpoint, the one-tile ONNX export (host.vision_export), a real fp16 vision.rknn from rknn-toolkit2
(host.vision_rknn; it is never run in these tests, the board runs it), the text model extracted
to a standalone Llama folder, the fp16 embedding table, tokenizer.json and host.bundle_writer's
manifest. Emulation reads host/vision.onnx and host/decoder only.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parent.parent
_BUILT: dict[tuple, Path] = {}


def _extract_decoder(model: Any, out: Path) -> None:
    """The checkpoint's text model + lm_head as a standalone LlamaForCausalLM folder."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    text_cfg = model.config.text_config.to_dict()
    for key in ("architectures", "model_type", "transformers_version", "_name_or_path"):
        text_cfg.pop(key, None)
    config = LlamaConfig(**text_cfg)
    llama = LlamaForCausalLM(config).eval()
    state = {f"model.{k}": v for k, v in model.model.text_model.state_dict().items()}
    state["lm_head.weight"] = model.lm_head.weight
    missing, unexpected = llama.load_state_dict(state, strict=False)
    assert not unexpected and all("rotary" in m for m in missing), (missing, unexpected)
    with torch.no_grad():
        llama.save_pretrained(out)


def build_bundle(root: Path, checkpoint_path: Path, *, skip_rknn: bool = False, video: dict | None = None) -> Path:
    """A bundle folder for `checkpoint_path` (see the module docstring)."""
    from board import bundle as B
    from board.tiles import SplitSettings
    from host.bundle_writer import (
        embeddings_section, eos_token_ids, model_section, package_version, tokenizer_section, write_manifest,
    )
    from host.checkpoint import load_checkpoint
    from host.prompt_format import prompt_format_from_processor, tokenizer_json
    from host.vision_export import export_onnx, vision_tower

    ck = load_checkpoint(checkpoint_path)
    processor = ck.load_processor()
    model = ck.load_model()
    fmt = prompt_format_from_processor(processor, ck.chat_template)
    (root / B.HOST_DIR).mkdir(parents=True, exist_ok=True)
    tower = vision_tower(model.model.vision_model, model.model.connector, "conv")
    export_onnx(tower, root / B.VISION_ONNX)
    _extract_decoder(model, root / B.DECODER_HF)
    table = model.model.text_model.embed_tokens.weight.detach().numpy().astype(np.float16)
    np.save(root / B.EMBEDDINGS, table)
    (root / B.TOKENIZER).write_text(tokenizer_json(processor.tokenizer))
    settings = SplitSettings.from_preprocessor(ck.preprocessor)
    vision = {"file": B.VISION_RKNN, "layout": "conv", "tokens_per_tile": ck.image_seq_len, "tile": settings.tile}
    if skip_rknn:
        (root / B.VISION_RKNN).write_bytes(b"not built: emulation-only test bundle\n")
        vision["dtype"] = "not built"
    else:
        from host.vision_rknn import BuildOptions, Progress, convert_vision

        report = convert_vision(tower, settings, root / "rknn-build", BuildOptions(dtype="fp16"), holdout_tiles=1,
                                progress=Progress(enabled=False))
        (root / "rknn-build" / "vision.rknn").rename(root / B.VISION_RKNN)
        vision["dtype"] = report["dtype"]
    write_manifest(
        root,
        checkpoint=ck,
        prompt_format=fmt,
        tokenizer_info=tokenizer_section(processor.tokenizer, fmt),
        vision=vision,
        decoder={"file": None, "hidden_size": int(ck.text_config["hidden_size"]), "max_context": 4096},
        embeddings=embeddings_section(table),
        generation={"eos_token_ids": eos_token_ids(ck, processor.tokenizer)},
        video=video,
    )
    return root


def tiny_bundle_for(tmp_path_factory: Any, tiny_checkpoint: Any, family: str = "256m", **kwargs: Any) -> Path:
    """A bundle per (family, options), built once per test session and shared by every module."""
    key = (family, json.dumps(kwargs, sort_keys=True))
    if key not in _BUILT:
        root = tmp_path_factory.mktemp(f"bundle-{family}")
        _BUILT[key] = build_bundle(root, tiny_checkpoint(family), skip_rknn=True, **kwargs)
    return _BUILT[key]


class Oracle:
    """transformers' own processor and model for a tiny checkpoint: what the board must reproduce."""

    def __init__(self, checkpoint_path: Path):
        from host.checkpoint import load_checkpoint

        ck = load_checkpoint(checkpoint_path)
        self.checkpoint = ck
        self.processor = ck.load_processor()
        self.model = ck.load_model()

    def inputs(self, messages: list, images: list, **processor_kwargs: Any) -> Any:
        from PIL import Image

        text = self.processor.apply_chat_template(messages, add_generation_prompt=True)
        pil = [Image.open(p).convert("RGB") for p in images]
        return self.processor(text=text, images=pil or None, return_tensors="pt", **processor_kwargs)

    def generate(self, inputs: Any, max_new_tokens: int) -> list[int]:
        import torch

        with torch.no_grad():
            out = self.model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
        return out[0, inputs["input_ids"].shape[1]:].tolist()

    def inputs_embeds(self, inputs: Any) -> np.ndarray:
        """The reference's merged sequence (text embeddings with the image features scattered in)."""
        import torch

        inner = self.model.model
        with torch.no_grad():
            embeds = inner.get_input_embeddings()(inputs["input_ids"])
            if "pixel_values" in inputs:
                feats = inner.get_image_features(inputs["pixel_values"], inputs.get("pixel_attention_mask")).pooler_output
                embeds = inner.inputs_merger(inputs["input_ids"], embeds, torch.cat(list(feats)))
        return embeds[0].numpy()


def run_cli(*args: str, cwd: Path | None = None, timeout: float = 300) -> Any:
    """`python board/run.py ...` as a subprocess, the way a user runs it from a copied folder."""
    import os
    import subprocess

    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}  # the script must find its package itself
    return subprocess.run([sys.executable, str(ROOT / "board" / "run.py"), *args], capture_output=True, text=True,
                          timeout=timeout, cwd=cwd or ROOT, env=env)


def write_image(path: Path, h: int, w: int, seed: int) -> Path:
    """A photo-like PNG (smooth fields + noise) so tiles differ from each other."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    img = np.stack([128 + 90 * np.sin(x / (31 + seed) + y / 97), 128 + 90 * np.cos(y / 29 - x / 300),
                    128 + 70 * np.sin((x - y) / 17)], -1) + rng.normal(0, 12, (h, w, 3))
    Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(path)
    return path


@pytest.fixture(scope="session")
def images(tmp_path_factory: Any) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("images")
    return {"wide": write_image(d / "wide.png", 600, 900, 1), "tall": write_image(d / "tall.png", 700, 400, 2),
            "small": write_image(d / "small.png", 300, 300, 3)}


def json_answer(result: Any) -> dict:
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def stopping_checkpoint(source: Path, out: Path, token_id: int, factor: float = 1.05) -> Path:
    """A copy of a tiny checkpoint whose end-of-turn token wins wherever `token_id` would (its lm_head
    row is that token's, scaled up), so greedy answers end with the end-of-turn token as real ones do."""
    import shutil

    import torch
    from host.checkpoint import load_checkpoint

    shutil.copytree(source, out)
    ck = load_checkpoint(out)
    model = ck.load_model()
    eos = ck.load_tokenizer().eos_token_id
    with torch.no_grad():
        model.lm_head.weight[eos] = model.lm_head.weight[token_id] * factor
    model.save_pretrained(out)
    return out
