"""One command from a SmolVLM checkpoint to the bundle folder the RK3588 board runs.

    python -m host.convert --model HuggingFaceTB/SmolVLM-256M-Instruct --out bundles/smolvlm-256m
    python -m host.convert --tiny 256m --out demo-bundle --skip-decoder    # offline, random weights

Stages, in order (each one's completion is recorded in <out>/host/convert_state.json with a
fingerprint of its inputs and options; a finished stage whose fingerprint still matches is not redone,
so an interrupted or repeated conversion resumes, and a changed option redoes only what it affects):

  text         tokenizer.json, embed_tokens.npy (fp16) and the prompt format, checked against the
               checkpoint's Jinja chat template
  decoder      host/decoder: the text model as a standalone LlamaForCausalLM folder (logits checked)
  calibration  host/decoder_calibration_samples.json (+ folder; or host/decoder_calibration.json with
               --decoder-calibration-layout input_embed): multimodal sequences for W8A8 (+ hold-out set)
  vision       vision.rknn (+ host/vision.onnx, accuracy and op reports): rknn-toolkit2, simulator-checked
  vision-fallback  (--vision-fallback) vision_conv.rknn: the fp16 model in Rockchip's conv input layout
  reference    reference.npz + the manifest's reference: what `python -m board doctor` compares with
  rkllm        decoder.rkllm (+ host/decoder.accuracy.json, host/decoder.log): rkllm-toolkit 1.3.0 W8A8,
               run in its own venv (.venv-rkllm, scripts/setup_rkllm_toolkit.sh) as a subprocess
  manifest     manifest.json: settings, versions and the sha256 of every file (always rewritten)
  self-check   the bundle opened as the board opens it; its prompt format and tokenizer reproduce the
               reference processor's token ids and pixels on a real image (always run)

With --skip-decoder the calibration and rkllm stages are left out (rkllm-toolkit is not needed);
the bundle then runs in x86 emulation, and on a board once decoder.rkllm is added by a full convert.
"""

from __future__ import annotations

import argparse
import gc
import hashlib
import json
import os
import resource
import shutil
import sys
import time
import warnings
from dataclasses import asdict
from functools import cached_property
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import numpy as np

from board import __version__ as PACKAGE_VERSION
from board import bundle as B
from board import bundle_schema as S
from board.errors import InputError, SmolVLMError
from board.prompt import PromptFormat

STATE = "host/convert_state.json"
REPORT = "host/convert_report.json"
STAGES = ("text", "decoder", "calibration", "vision", "vision-fallback", "reference", "rkllm", "manifest", "self-check")
DEFAULT_MAX_CONTEXT = 4096
LLAMA_DEFAULT_POSITIONS = 8192  # a text config without max_position_embeddings (never seen in SmolVLM)
# the standalone decoder must reproduce SmolVLM's text path: same weights, same fp32 arithmetic
DECODER_MAX_ABS_DIFF = 1e-3
# pixel parity of the board front end vs the reference processor, as in the front-end tests
PIXEL_MEAN_TOL, PIXEL_MAX_TOL = 0.01, 0.1
SELF_CHECK_QUESTION = "What is in this image?"
M = S.Manifest


class SelfCheckError(SmolVLMError):
    """The finished bundle does not reproduce the reference processor: it must not be used."""


class DecoderExportError(SmolVLMError):
    """The extracted decoder does not compute what SmolVLM's text path computes."""


# ---------------------------------------------------------------------------------------------
# Progress, memory and stage bookkeeping
# ---------------------------------------------------------------------------------------------


class Log:
    """Progress lines with elapsed time on stderr."""

    def __init__(self, quiet: bool = False):
        self.start = time.monotonic()
        self.quiet = quiet

    def __call__(self, message: str) -> None:
        if not self.quiet:
            print(f"[convert {time.monotonic() - self.start:7.1f}s] {message}", file=sys.stderr, flush=True)


def reset_peak_rss() -> bool:
    """Reset this process's peak RSS (Linux: VmHWM via /proc/self/clear_refs), so it can be read per stage."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_rss_mb() -> float:
    """Peak RSS since the last reset (VmHWM), else since the process started (ru_maxrss)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return round(int(line.split()[1]) / 1024, 1)
    except OSError:
        pass
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


def fingerprint(*parts: Any) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def files_fingerprint(paths: Sequence[Path], *, content_limit: int = 64 << 20) -> str:
    """Names and contents of small files; name, size and mtime of large ones (weights)."""
    digest = hashlib.sha256()
    for path in sorted(Path(p) for p in paths):
        stat = path.stat()
        digest.update(f"{path.name}\0{stat.st_size}\0".encode())
        if stat.st_size <= content_limit:
            digest.update(B.sha256_file(path).encode())
        else:
            digest.update(str(stat.st_mtime_ns).encode())
    return digest.hexdigest()[:16]


class Stages:
    """Runs stages, skips the ones finished with the same fingerprint, and records time and peak RSS."""

    def __init__(self, root: Path, log: Log, force: bool):
        self.root, self.log, self.force = root, log, force
        self.path = root / STATE
        self.state: dict[str, Any] = {}
        if self.path.exists() and not force:
            try:
                self.state = json.loads(self.path.read_text())
            except json.JSONDecodeError:
                log(f"{STATE} is unreadable: every stage runs again")
        self.summary: dict[str, dict[str, Any]] = {}
        self.peak_mb = 0.0  # the highest stage peak (each stage resets the kernel's high-water mark)

    def run(self, name: str, key: str, outputs: Sequence[str], fn: Callable[[], dict[str, Any]],
            *, always: bool = False) -> dict[str, Any]:
        """Run fn() unless the stage finished earlier with fingerprint `key` and its outputs exist."""
        prev = self.state.get(name)
        if (not always and not self.force and prev and prev.get("fingerprint") == key
                and all((self.root / rel).exists() for rel in outputs)):
            self.log(f"{name}: done earlier with the same inputs, skipped")
            self.summary[name] = {"status": "skipped", "seconds": 0.0, "peak_rss_mb": None}
            return prev["info"]
        number = STAGES.index(name) + 1
        self.log(f"stage {number}/{len(STAGES)} {name} ...")
        if self.state.pop(name, None) is not None:
            self._save()  # an interrupted rerun must not leave the old record next to half-written outputs
        per_stage = reset_peak_rss()
        t0 = time.monotonic()
        info = fn()
        seconds = round(time.monotonic() - t0, 1)
        rss = peak_rss_mb() if per_stage else None
        self.peak_mb = max(self.peak_mb, rss or 0.0)
        self.summary[name] = {"status": "ran", "seconds": seconds, "peak_rss_mb": rss}
        self.log(f"{name} done in {seconds}s" + (f", peak RSS {rss:.0f} MB" if rss else ""))
        self.state[name] = {"fingerprint": key, "finished": time.strftime("%Y-%m-%dT%H:%M:%S"), "seconds": seconds,
                            "info": info}
        self._save()
        return info

    def not_run(self, name: str, why: str) -> None:
        self.summary[name] = {"status": f"not run ({why})", "seconds": 0.0, "peak_rss_mb": None}

    def _save(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.state, indent=2, default=str) + "\n")
        os.replace(tmp, self.path)


# ---------------------------------------------------------------------------------------------
# The job: the checkpoint and what is loaded from it, once, when a stage needs it
# ---------------------------------------------------------------------------------------------


class Job:
    def __init__(self, args: argparse.Namespace, root: Path, log: Log):
        self.args, self.root, self.log = args, root, log

    @cached_property
    def checkpoint(self) -> Any:
        from host.checkpoint import DEFAULT_MODEL, load_checkpoint

        if self.args.tiny:
            from host.tiny_model import build_tiny_checkpoint

            folder = self.root / B.HOST_DIR / f"tiny-checkpoint-{self.args.tiny}"
            if not (folder / "config.json").exists():
                self.log(f"building the embedded tiny {self.args.tiny} model (random weights, real geometry) in {folder}")
                build_tiny_checkpoint(folder, self.args.tiny)
            checkpoint = load_checkpoint(folder)
            checkpoint.model_id = f"tiny-{self.args.tiny} (random weights, built offline)"
            return checkpoint
        model = self.args.model or DEFAULT_MODEL
        self.log(f"checkpoint {model}")
        return load_checkpoint(model, revision=self.args.revision)

    @cached_property
    def checkpoint_key(self) -> str:
        ck = self.checkpoint
        files = [p for p in ck.path.iterdir() if p.is_file()]
        return fingerprint(ck.model_id, ck.revision, files_fingerprint(files))

    @cached_property
    def processor(self) -> Any:
        return self.checkpoint.load_processor()

    @cached_property
    def settings(self) -> Any:
        from board.tiles import SplitSettings

        return SplitSettings.from_preprocessor(self.checkpoint.preprocessor)

    @cached_property
    def model(self) -> Any:
        self.log("loading the checkpoint's weights (fp32)")
        return self.checkpoint.load_model()

    @cached_property
    def tower(self) -> Any:
        from host.vision_export import vision_tower

        inner = self.model.model
        return vision_tower(inner.vision_model, inner.connector, self.args.vision_layout, settings=self.settings)

    @cached_property
    def conv_tower(self) -> Any:
        """The tower in Rockchip's own conv input layout, for --vision-fallback."""
        from host.vision_export import vision_tower

        inner = self.model.model
        return vision_tower(inner.vision_model, inner.connector, "conv", settings=self.settings)

    def release_model(self) -> None:
        """Free the PyTorch weights before the toolkits load their own copies."""
        for name in ("model", "tower", "conv_tower"):
            self.__dict__.pop(name, None)
        gc.collect()

    def calibration_images(self) -> list[Path]:
        from calibration.vision_tiles import default_images, find_images

        if not self.args.calibration:
            return default_images("calibration")
        images = find_images([self.args.calibration])
        if not images:
            raise InputError(f"no images (.jpg, .png, ...) in {self.args.calibration}")
        return images

    @staticmethod
    def holdout_images() -> list[Path]:
        from calibration.vision_tiles import default_images

        return default_images("holdout")


# ---------------------------------------------------------------------------------------------
# Stages
# ---------------------------------------------------------------------------------------------


def stage_text(job: Job) -> dict[str, Any]:
    """Prompt format (derived from the template and checked), tokenizer.json and the fp16 table."""
    from host.bundle_writer import embeddings_section, generation_section, tokenizer_section, video_section
    from host.decoder_export import end_of_turn_token_id
    from host.prompt_format import prompt_format_from_processor, tokenizer_json

    ck, processor = job.checkpoint, job.processor
    fmt = prompt_format_from_processor(processor, ck.chat_template)
    tokenizer = processor.tokenizer
    (job.root / B.TOKENIZER).write_text(tokenizer_json(tokenizer), encoding="utf-8")
    weights = job.model.model.text_model.embed_tokens.weight.detach().float().numpy()
    if not np.isfinite(weights).all() or np.abs(weights).max() > np.finfo(np.float16).max:
        raise InputError("the embedding table does not fit float16 (inf/nan or values beyond 65504)")
    table = weights.astype(np.float16)
    np.save(job.root / B.EMBEDDINGS, table)
    return {  # the manifest's sections, under their keys
        M.PROMPT: fmt.to_dict(),
        M.TOKENIZER: tokenizer_section(tokenizer, fmt),
        M.EMBEDDINGS: embeddings_section(table),
        M.GENERATION: generation_section(ck, tokenizer, end_of_turn_token_id(fmt, tokenizer)),
        M.VIDEO: video_section(ck),
    }


def stage_decoder(job: Job, text: dict[str, Any]) -> dict[str, Any]:
    """The standalone Llama folder, then its logits against SmolVLM's own text path."""
    import torch
    from tokenizers import Tokenizer

    from board.prompt import render_chat
    from host.decoder_export import compare_logits, export_decoder, load_decoder, source_dtype

    ck = job.checkpoint
    folder = job.root / B.DECODER_HF
    if folder.exists():
        shutil.rmtree(folder)
    info = export_decoder(
        job.model, job.processor.tokenizer, folder, eos_ids=text[M.GENERATION][S.Generation.EOS_TOKEN_IDS],
        dtype=source_dtype(ck.config), source={"model": ck.model_id, "revision": ck.revision},
    )
    fmt = PromptFormat.from_dict(text[M.PROMPT])
    tokenizer = Tokenizer.from_file(str(job.root / B.TOKENIZER))
    messages = [{"role": "user", "content": "Describe the picture, then list three colours."}]
    ids = tokenizer.encode(render_chat(messages, fmt)).ids
    embed = job.model.model.text_model.embed_tokens
    noise = torch.Generator().manual_seed(0)
    with torch.no_grad():
        embeds = embed(torch.tensor([ids]))
        rows = torch.randn(1, 16, embeds.shape[-1], generator=noise) * embeds.std()  # stand-ins for image rows
        embeds = torch.cat([embeds, rows], dim=1)
    check = compare_logits(job.model, load_decoder(folder), embeds)
    job.log(f"decoder folder vs SmolVLM text path: max abs logit diff {check['max_abs_diff']:.2e} "
            f"over {check['tokens']} positions")
    if check["max_abs_diff"] > DECODER_MAX_ABS_DIFF or check["argmax_agreement"] < 1.0:
        raise DecoderExportError(
            f"the extracted decoder disagrees with SmolVLM's text path: {check}",
            hint="this checkpoint's text model is not a plain Llama; it needs support in host/decoder_export.py",
        )
    return {**info, "equivalence": check}


def stage_calibration(job: Job, text: dict[str, Any]) -> dict[str, Any]:
    """The multimodal W8A8 calibration set and the held-out samples, in host/."""
    from tokenizers import Tokenizer

    from calibration.decoder_dataset import SequenceBuilder, build_decoder_calibration
    from host.decoder_export import load_decoder
    from host.vision_export import reference_features

    tokenizer = Tokenizer.from_file(str(job.root / B.TOKENIZER))
    settings, tower = job.settings, job.tower
    builder = SequenceBuilder(
        fmt=PromptFormat.from_dict(text[M.PROMPT]), tokenizer=tokenizer,
        image_token_id=text[M.TOKENIZER][S.Tokenizer.IMAGE_TOKEN_ID], settings=settings,
        table=np.load(job.root / B.EMBEDDINGS), features=lambda tiles: reference_features(tower, tiles, settings),
    )
    return build_decoder_calibration(
        job.root / B.HOST_DIR, builder=builder, decoder=load_decoder(job.root / B.DECODER_HF), tokenizer=tokenizer,
        eos_ids=text[M.GENERATION][S.Generation.EOS_TOKEN_IDS], images=job.calibration_images(),
        holdout_images=job.holdout_images(), calibration_tiles=job.args.decoder_calibration_tiles,
        max_new_tokens=job.args.decoder_target_tokens, layout=job.args.decoder_calibration_layout,
        progress=lambda message: job.log(f"calibration: {message}"),
    )


def stage_vision(job: Job, options: Any) -> dict[str, Any]:
    from host.bundle_writer import vision_section
    from host.vision_rknn import Progress, convert_vision

    host = job.root / B.HOST_DIR
    report = convert_vision(
        job.tower, job.settings, host, options, calibration_images=job.calibration_images(),
        holdout_images=job.holdout_images(), name="vision", progress=Progress(enabled=not job.log.quiet),
    )
    os.replace(host / "vision.rknn", job.root / B.VISION_RKNN)
    return {"section": vision_section(report), "accuracy": report["accuracy"], "rknn_mb": report.get("rknn_mb")}


def stage_vision_fallback(job: Job) -> dict[str, Any]:
    """The opt-in second vision model: fp16, conv layout (Rockchip's own input format)."""
    from host.vision_rknn import BuildOptions, Progress, convert_vision

    host = job.root / B.HOST_DIR
    report = convert_vision(
        job.conv_tower, job.settings, host, BuildOptions(dtype="fp16"), holdout_images=job.holdout_images(),
        name="vision_conv", progress=Progress(enabled=not job.log.quiet),
    )
    os.replace(host / "vision_conv.rknn", job.root / S.VISION_FALLBACK_RKNN)
    F = S.VisionFallback
    return {F.FILE: S.VISION_FALLBACK_RKNN, F.ONNX: S.VISION_FALLBACK_ONNX, F.DTYPE: report["dtype"],
            F.LAYOUT: report["layout"], F.ACCURACY: {k: report["accuracy"][k] for k in S.keys(S.VisionAccuracy)}}


def stage_reference(job: Job, text: dict[str, Any]) -> dict[str, Any]:
    """What the board doctor compares with: a tile's full-precision rows and the fp32 decoder's greedy ids."""
    from tokenizers import Tokenizer

    from calibration.decoder_dataset import greedy_ids
    from host.decoder_export import load_decoder
    from host.reference import write_reference
    from host.vision_export import reference_features

    settings, tower = job.settings, job.tower
    section = write_reference(
        job.root, image=job.holdout_images()[0], settings=settings,
        features=lambda tiles: reference_features(tower, tiles, settings), decoder=load_decoder(job.root / B.DECODER_HF),
        fmt=PromptFormat.from_dict(text[M.PROMPT]), tokenizer=Tokenizer.from_file(str(job.root / B.TOKENIZER)),
        image_token_id=text[M.TOKENIZER][S.Tokenizer.IMAGE_TOKEN_ID], table=np.load(job.root / B.EMBEDDINGS),
        eos_ids=text[M.GENERATION][S.Generation.EOS_TOKEN_IDS], greedy=greedy_ids,
    )
    eos = section[S.Reference.EOS_PROMPT]
    job.log(f"reference: {section[S.Reference.SOURCE]} tile; greedy ids "
            + ", ".join(f"{p['name']} {len(p['greedy_ids'])}" for p in section[S.Reference.PROMPTS])
            + (f"; eos check on '{eos['name']}' ({len(eos['greedy_ids'])} tokens)" if eos
               else f"; the model ends none of the eos candidates within {section[S.Reference.EOS_SEARCH_TOKENS]} "
                    "tokens, so the doctor's eos check will be skipped"))
    return section


def stage_rkllm(job: Job, options: Any) -> dict[str, Any]:
    from calibration.decoder_dataset import HOLDOUT, dataset_file
    from host.decoder_rkllm import build_decoder_rkllm

    host = job.root / B.HOST_DIR
    layout = job.args.decoder_calibration_layout
    report = build_decoder_rkllm(
        job.root / B.DECODER_HF, host / dataset_file(layout), host / "decoder.rkllm", layout=layout, options=options,
        holdout=host / HOLDOUT, hidden_size=json.loads((job.root / B.DECODER_HF / "config.json").read_text())["hidden_size"],
        python=job.args.rkllm_python, progress=lambda message: job.log(f"rkllm: {message}"),
    )
    os.replace(host / "decoder.rkllm", job.root / B.DECODER_RKLLM)
    return report


def stage_manifest(job: Job, text: dict[str, Any], vision: dict[str, Any], rkllm: Optional[dict[str, Any]],
                   max_context: int, fallback: Optional[dict[str, Any]] = None,
                   reference: Optional[dict[str, Any]] = None) -> dict[str, Any]:
    from host.bundle_writer import decoder_section, write_manifest

    hf_config = json.loads((job.root / B.DECODER_HF / "config.json").read_text())
    section = dict(vision["section"])
    if fallback:
        section[S.Vision.FALLBACK] = fallback
    manifest = write_manifest(
        job.root,
        checkpoint=job.checkpoint,
        prompt_format=PromptFormat.from_dict(text[M.PROMPT]),
        tokenizer_info=text[M.TOKENIZER],
        vision=section,
        decoder=decoder_section(hf_config, max_context=max_context, rkllm=rkllm, embed_flash=job.args.embed_flash),
        embeddings=text[M.EMBEDDINGS],
        generation=text[M.GENERATION],
        video=text.get(M.VIDEO),
        reference=reference,
    )
    files = manifest[M.FILES]
    board_bytes = sum(e[S.FileEntry.BYTES] for rel, e in files.items() if not rel.startswith(S.HOST_DIR + "/"))
    return {"files": len(files), "board_mb": round(board_bytes / 1e6, 1)}


def self_check_conversations(image: Path) -> list[tuple[list[dict[str, Any]], list[Path]]]:
    """What the self-check renders, as (messages, image paths): a question about one image, and a
    text-only chat with a system turn, a blank line and an earlier answer (the template's edge cases)."""
    return [
        ([{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": SELF_CHECK_QUESTION}]}], [image]),
        ([{"role": "system", "content": [{"type": "text", "text": "Be brief."}]},
          {"role": "user", "content": [{"type": "text", "text": "Hello!\n\nWho are you?"}]},
          {"role": "assistant", "content": [{"type": "text", "text": " A model."}]},
          {"role": "user", "content": [{"type": "text", "text": "And?"}]}], []),
    ]


def _reference_inputs(processor: Any, messages: list[dict[str, Any]], images: Sequence[Path]) -> Any:
    """The reference processor's input_ids and pixel_values for a conversation (EXIF-rotated images, as load_image)."""
    from PIL import Image, ImageOps

    text = processor.apply_chat_template(messages, add_generation_prompt=True)
    return processor(text=text, images=[ImageOps.exif_transpose(Image.open(p)) for p in images] or None)


def _check_token_ids(ours: list[int], reference: list[int]) -> None:
    if ours != reference:
        first = next((i for i, (a, b) in enumerate(zip(ours, reference)) if a != b), min(len(ours), len(reference)))
        raise SelfCheckError(
            f"the bundle's prompt format + tokenizer give {len(ours)} token ids, the reference processor "
            f"{len(reference)}; they first differ at position {first}",
            hint="this checkpoint's template or tokenizer is not supported yet; do not use this bundle",
        )


def _check_pixels(tiled: Any, reference: Any, image_name: str) -> dict[str, Any]:
    """The board front end's tiles (normalized) against the reference's pixel_values, within PIXEL_*_TOL."""
    ours = tiled.normalized()
    theirs = np.asarray(reference[: len(ours)], np.float32)
    diff = np.abs(ours - theirs) if ours.shape == theirs.shape else None
    if diff is None or diff.mean() > PIXEL_MEAN_TOL or diff.max() > PIXEL_MAX_TOL:
        raise SelfCheckError(
            f"the board front end's tiles differ from the reference processor's for {image_name}: "
            + ("shapes " + f"{ours.shape} vs {theirs.shape}" if diff is None
               else f"mean {diff.mean():.4f} / max {diff.max():.4f} on the [-1, 1] scale"),
            hint="the preprocessor settings in the manifest do not reproduce the checkpoint's; do not use this bundle",
        )
    return {"pixel_max_abs_diff": float(diff.max()), "tiles": len(ours)}


def _check_end_of_turn(job: Job, bundle: Any, tokenizer: Any) -> None:
    """Generation stops at the end of the turn: the bundle's first EOS id and the decoder folder's are that token."""
    end_of_turn = tokenizer.encode(bundle.prompt_format.end_of_turn, add_special_tokens=False).ids[0]
    if bundle.eos_token_ids[0] != end_of_turn:
        raise SelfCheckError(f"the bundle's first EOS id {bundle.eos_token_ids[0]} is not the end-of-turn token {end_of_turn}")
    decoder_eos = json.loads((job.root / B.DECODER_HF / "config.json").read_text())["eos_token_id"]
    if (decoder_eos if isinstance(decoder_eos, int) else decoder_eos[0]) != end_of_turn:
        raise SelfCheckError(f"{B.DECODER_HF}/config.json has eos {decoder_eos}, not the end-of-turn token {end_of_turn}")


def stage_self_check(job: Job) -> dict[str, Any]:
    """Open the bundle as the board does and reproduce the reference processor on a real image."""
    from board.image_io import load_image
    from board.prompt import build_prompt
    from board.tiles import split_image

    bundle = B.Bundle.open(job.root, verify=True)
    tokenizer = bundle.tokenizer()
    image_path = job.holdout_images()[0]
    checked: dict[str, Any] = {}
    for messages, images in self_check_conversations(image_path):
        tiled = [split_image(load_image(p), bundle.split_settings) for p in images]
        prompt = build_prompt(messages, [t.plan for t in tiled], bundle.prompt_format, tokenizer, bundle.image_token_id)
        ref = _reference_inputs(job.processor, messages, images)
        _check_token_ids(prompt.input_ids.tolist(), list(ref["input_ids"][0]))
        if tiled:
            checked.update(_check_pixels(tiled[0], ref["pixel_values"][0], image_path.name))
        checked["image_prompt_tokens" if images else "text_prompt_tokens"] = len(prompt)
    _check_end_of_turn(job, bundle, tokenizer)
    job.log(f"self-check passed on {image_path.name}: {checked}")
    return {"image": image_path.name, **checked}


# ---------------------------------------------------------------------------------------------
# The command
# ---------------------------------------------------------------------------------------------


VISION_FLAGS = "vision-"  # host.convert's prefix for host.vision_rknn's build flags (--vision-dtype, ...)


def vision_options(args: argparse.Namespace) -> Any:
    from host.vision_rknn import options_from_args

    return options_from_args(args, VISION_FLAGS)


def convert(args: argparse.Namespace, log: Log) -> dict[str, Any]:
    """Run every stage; return the summary (also written to host/convert_report.json)."""
    from board.system_checks import package_version
    from host.decoder_rkllm import RKLLMOptions, require_rkllm_toolkit, toolkit_version, validate_max_context
    from host.vision_rknn import require_rknn_toolkit

    t_start = time.monotonic()
    root = Path(args.out).expanduser().resolve()
    if root.exists() and not root.is_dir():
        raise InputError(f"--out {root} exists and is not a folder")
    (root / B.HOST_DIR).mkdir(parents=True, exist_ok=True)
    # what is missing is said before anything long starts
    require_rknn_toolkit()
    if not args.skip_decoder:
        require_rkllm_toolkit(args.rkllm_python)
    v_options = vision_options(args)
    if args.vision_fallback and v_options.dtype == "fp16" and args.vision_layout == "conv":
        raise InputError("--vision-fallback adds an fp16 conv-layout vision model, which this bundle's main one already is",
                         hint="drop --vision-fallback, or keep the default --vision-layout patches")
    job = Job(args, root, log)
    stages = Stages(root, log, args.force)
    ck = job.checkpoint
    model_max = int(ck.text_config.get("max_position_embeddings", LLAMA_DEFAULT_POSITIONS))
    max_context = validate_max_context(
        args.max_context if args.max_context is not None else min(DEFAULT_MAX_CONTEXT, model_max - model_max % 32),
        model_max=model_max,
    )
    base = fingerprint(job.checkpoint_key, PACKAGE_VERSION)
    images_key = files_fingerprint(job.calibration_images())
    holdout_key = files_fingerprint(job.holdout_images())

    text = stages.run("text", fingerprint("text", base), [B.TOKENIZER, B.EMBEDDINGS], lambda: stage_text(job))
    decoder_key = fingerprint("decoder", base)
    decoder = stages.run("decoder", decoder_key, [B.DECODER_HF + "/config.json"], lambda: stage_decoder(job, text))
    calibration_key = fingerprint("calibration", decoder_key, images_key, holdout_key, args.decoder_calibration_tiles,
                                  args.decoder_target_tokens, args.decoder_calibration_layout)
    if args.skip_decoder:
        stages.not_run("calibration", "--skip-decoder")
    else:
        from calibration.decoder_dataset import dataset_file

        stages.run("calibration", calibration_key, [f"{B.HOST_DIR}/{dataset_file(args.decoder_calibration_layout)}"],
                   lambda: stage_calibration(job, text))
    vision_key = fingerprint("vision", base, asdict(v_options), args.vision_layout,
                             images_key if v_options.dtype == "int8" else None,
                             holdout_key, package_version("rknn-toolkit2"))
    vision = stages.run("vision", vision_key, [B.VISION_RKNN, B.VISION_ONNX], lambda: stage_vision(job, v_options))
    fallback = None
    if args.vision_fallback:
        fallback = stages.run("vision-fallback", fingerprint("vision-fallback", base, holdout_key,
                                                             package_version("rknn-toolkit2")),
                              [S.VISION_FALLBACK_RKNN, S.VISION_FALLBACK_ONNX], lambda: stage_vision_fallback(job))
    else:
        stages.not_run("vision-fallback", "no --vision-fallback")
        for stale in (S.VISION_FALLBACK_RKNN, S.VISION_FALLBACK_ONNX):
            if (root / stale).exists():
                (root / stale).unlink()
                log(f"removed {stale} of an earlier run: this bundle is converted without --vision-fallback")
    reference = stages.run("reference", fingerprint("reference", decoder_key, holdout_key), [S.REFERENCE],
                           lambda: stage_reference(job, text))
    job.release_model()
    rkllm = None
    if args.skip_decoder:
        stages.not_run("rkllm", "--skip-decoder")
        if (root / B.DECODER_RKLLM).exists():
            (root / B.DECODER_RKLLM).unlink()
            log(f"removed {B.DECODER_RKLLM} of an earlier run: this bundle is converted with --skip-decoder")
    else:
        r_options = RKLLMOptions(max_context=max_context, optimization_level=args.rkllm_optimization_level)
        rkllm_key = fingerprint("rkllm", decoder_key, calibration_key, asdict(r_options),
                                toolkit_version(args.rkllm_python), args.decoder_calibration_layout)
        rkllm = stages.run("rkllm", rkllm_key, [B.DECODER_RKLLM], lambda: stage_rkllm(job, r_options))
    written = stages.run("manifest", "", [], lambda: stage_manifest(job, text, vision, rkllm, max_context, fallback,
                                                                    reference), always=True)
    check = stages.run("self-check", "", [], lambda: stage_self_check(job), always=True)

    summary = {
        "bundle": str(root),
        "model": ck.model_id,
        "tiny": ck.is_tiny,
        "note": ck.note,
        "decoder": B.DECODER_RKLLM if rkllm else "skipped (--skip-decoder)",
        "board_mb": written["board_mb"],
        "max_context": max_context,
        "vision_accuracy": {k: vision["accuracy"][k] for k in ("cosine_min", "cosine_mean")},
        "decoder_equivalence_max_abs_diff": decoder["equivalence"]["max_abs_diff"],
        "decoder_accuracy": {k: v for k, v in (rkllm or {}).get("accuracy", {}).items() if k != "samples"} or None,
        "self_check": check,
        "stages": stages.summary,
        "total_seconds": round(time.monotonic() - t_start, 1),
        "peak_rss_mb": max(stages.peak_mb, peak_rss_mb()),
    }
    (root / REPORT).write_text(json.dumps(summary, indent=2, default=str) + "\n")
    return summary


def print_summary(summary: dict[str, Any]) -> None:
    lines = [f"\nbundle: {summary['bundle']}  ({summary['board_mb']} MB for the board"
             + (f"; {summary['note']})" if summary["note"] else ")")]
    lines.append(f"{'stage':<16} {'status':<28} {'seconds':>8} {'peak RSS MB':>12}")
    for name in STAGES:
        row = summary["stages"].get(name)
        if row:
            rss = "-" if row["peak_rss_mb"] is None else f"{row['peak_rss_mb']:.0f}"
            lines.append(f"{name:<16} {row['status']:<28} {row['seconds']:>8.1f} {rss:>12}")
    lines.append(f"{'total':<16} {'':<28} {summary['total_seconds']:>8.1f} {summary['peak_rss_mb']:>12.0f}")
    acc = summary["vision_accuracy"]
    lines.append(f"vision simulator vs PyTorch: cosine min {acc['cosine_min']:.5f}; decoder: {summary['decoder']}")
    print("\n".join(lines), file=sys.stderr)


def build_parser() -> argparse.ArgumentParser:
    from host.checkpoint import DEFAULT_MODEL
    from host.tiny_model import FAMILIES
    from host.vision_rknn import add_build_arguments

    parser = argparse.ArgumentParser(
        prog="python -m host.convert",
        description="Convert a SmolVLM checkpoint into a bundle folder for the RK3588 (vision.rknn, decoder.rkllm, "
                    "embedding table, tokenizer, manifest). Stages that finished with the same inputs are not redone.",
        epilog="Needs rknn-toolkit2 (scripts/setup.sh installs it) and, unless --skip-decoder, Rockchip's "
               "rkllm-toolkit 1.3.0. Copy the bundle folder to the board; its host/ subfolder is only for x86 emulation.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--model", help=f"Hugging Face id or local checkpoint folder (default {DEFAULT_MODEL})")
    source.add_argument("--tiny", choices=sorted(FAMILIES),
                        help="use an embedded tiny random-weight model of this family instead (offline; answers are noise)")
    parser.add_argument("--revision", help="Hub revision (branch, tag or commit) of --model")
    parser.add_argument("--out", required=True, help="bundle folder to create or resume")
    parser.add_argument("--skip-decoder", action="store_true",
                        help="do not build decoder.rkllm (no rkllm-toolkit needed; the bundle then runs in x86 emulation only)")
    parser.add_argument("--max-context", type=str, default=None,
                        help=f"decoder context in tokens: a multiple of 32, at most 16384 and the model's trained context "
                             f"(default {DEFAULT_MAX_CONTEXT}; one fully split image is ~1100 tokens for 256M/500M)")
    parser.add_argument("--calibration", metavar="FOLDER",
                        help="images for int8 calibration of the vision model and the decoder (default: the shipped set)")
    parser.add_argument("--force", action="store_true", help="redo every stage")
    parser.add_argument("--quiet", action="store_true", help="no progress lines (errors and the summary only)")
    add_build_arguments(parser.add_argument_group("vision model (rknn-toolkit2)"), VISION_FLAGS)
    decoder = parser.add_argument_group("decoder calibration (W8A8)")
    decoder.add_argument("--decoder-calibration-tiles", type=int, default=48,
                         help="reference vision tiles spent on the calibration set (~4 s each at full size)")
    decoder.add_argument("--decoder-target-tokens", type=int, default=32,
                         help="length of the reference answers used as calibration targets")
    decoder.add_argument("--decoder-calibration-layout", choices=S.CALIBRATION_LAYOUTS, default=S.CALIBRATION_LAYOUTS[0],
                         help="'samples': Rockchip's 1.3.0 example layout (pickled forward inputs per sample + an index "
                              "json, handed to the toolkit); 'input_embed': the <=1.2.3 JSON of nested embedding lists")
    rkllm = parser.add_argument_group("decoder build (rkllm-toolkit 1.3.0, in its own venv)")
    rkllm.add_argument("--rkllm-python", metavar="PATH",
                       help="the toolkit venv's python (default: $SMOLVLM_RKLLM_PYTHON, else .venv-rkllm/bin/python, "
                            "made by scripts/setup_rkllm_toolkit.sh)")
    rkllm.add_argument("--rkllm-optimization-level", type=int, choices=(0, 1), default=0,
                       help="rkllm-toolkit build(optimization_level=...): 0 as rknn-llm's benchmark.md says all its "
                            "published figures were converted with; recorded in the manifest")
    rkllm.add_argument("--embed-flash", action="store_true",
                       help="record embed_flash=1 as the board's default (librkllmrt reads its word-embedding table "
                            "from flash: less RAM; the board feeds embeddings itself)")
    parser.add_argument("--vision-fallback", action="store_true",
                        help="also build vision_conv.rknn: the fp16 model in Rockchip's own conv input layout, which "
                             "the board uses with --vision-fallback if the patch layout misbehaves there")
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    log = Log(quiet=args.quiet)
    quiet_libraries()
    try:
        summary = convert(args, log)
    except SmolVLMError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    except OSError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("\ninterrupted: run the same command again to resume from the last finished stage", file=sys.stderr)
        return 130
    print_summary(summary)
    return 0


def quiet_libraries() -> None:
    """transformers' and the Hub's progress bars and advice would bury the stage lines."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    warnings.filterwarnings("ignore", category=FutureWarning)
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
    except ImportError:
        pass


if __name__ == "__main__":
    raise SystemExit(main())
