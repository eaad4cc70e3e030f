"""Tiny random-weight SmolVLM checkpoints built offline from a config.

Tests, benchmarks and the offline demo need a SmolVLM checkpoint folder without downloading one.
This builds a real Idefics3 checkpoint (the architecture the SmolVLM v1 checkpoints declare) with the
family's true geometry (tile size, patch size, pixel-shuffle scale, splitting settings) and the real
SmolVLM chat template and special tokens, but small hidden sizes and random weights. The answers of
such a model are noise; everything else (shapes, token layout, files) is what a real checkpoint has.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from board.tiles import tokens_per_tile
from host.checkpoint import TINY_MARKER

# The chat template the SmolVLM checkpoints ship (chat_template.json), verbatim.
SMOLVLM_CHAT_TEMPLATE = (
    "<|im_start|>{% for message in messages %}{{message['role'] | capitalize}}"
    "{% if message['content'][0]['type'] == 'image' %}{{':'}}{% else %}{{': '}}{% endif %}"
    "{% for line in message['content'] %}{% if line['type'] == 'text' %}{{line['text']}}"
    "{% elif line['type'] == 'image' %}{{ '<image>' }}{% endif %}{% endfor %}<end_of_utterance>\n"
    "{% endfor %}{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}"
)

# SmolLM2's own special tokens (ids 0..16 in the real vocabulary), then SmolVLM's additions.
_SMOLLM2_SPECIALS = [
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<repo_name>", "<reponame>", "<file_sep>",
    "<filename>", "<gh_stars>", "<issue_start>", "<issue_comment>", "<issue_closed>",
    "<jupyter_start>", "<jupyter_text>", "<jupyter_code>", "<jupyter_output>", "<jupyter_script>",
    "<empty_output>",
]
# SmolVLM's image tokens, in id order from 49152 in the real checkpoints; their <end_of_utterance>
# is at 49279 (host.demo_model puts it there), the tiny models add it right after these.
SMOLVLM_IMAGE_TOKENS = (
    ["<global-img>"]
    + [f"<row_{r}_col_{c}>" for r in range(1, 7) for c in range(1, 7)]
    + ["<fake_token_around_image>", "<image>"]
)
END_OF_UTTERANCE = "<end_of_utterance>"
# the tokenizer's additional_special_tokens, as the real checkpoints list them
SMOLVLM_SPECIAL_TOKENS = [*SMOLVLM_IMAGE_TOKENS, END_OF_UTTERANCE]

# A small English corpus so the BPE learns real merges (spaces, newlines, "\n\n", digits).
_CORPUS = """\
What is in this image? Describe the picture in detail. The image shows a cat sitting on a red sofa.
Read the text in the document and summarize it. The invoice total is 1,234.56 dollars.
How many people are in the photo? There are three people standing near a blue car.

Answer the question briefly. What color is the sky? The sky is blue with a few white clouds.
Can you describe the chart? The bar chart compares sales in 2021, 2022 and 2023 for four regions.
User: Hello! Assistant: Hi, how can I help you today? Please explain the table below.

Paragraph one ends here.

Paragraph two starts here.


Paragraph three follows two blank lines.

The quick brown fox jumps over the lazy dog. A screenshot of a settings page with buttons.
"""


@dataclass(frozen=True)
class Family:
    """The geometry that defines a SmolVLM family; everything else in a tiny model is small."""

    name: str
    tile: int  # vision image_size == preprocessor max_image_size
    patch: int
    scale_factor: int
    longest_edge: int  # preprocessor size.longest_edge

    @property
    def image_seq_len(self) -> int:
        return tokens_per_tile(self.tile, self.patch, self.scale_factor)


FAMILIES = {
    "256m": Family("256m", tile=512, patch=16, scale_factor=4, longest_edge=2048),
    "500m": Family("500m", tile=512, patch=16, scale_factor=4, longest_edge=2048),
    "2.2b": Family("2.2b", tile=384, patch=14, scale_factor=3, longest_edge=1536),
}


def build_tokenizer():
    """A byte-level BPE trained on a tiny corpus, with SmolVLM's special tokens, as a transformers tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=600,
        special_tokens=_SMOLLM2_SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator([_CORPUS] * 4, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<|im_start|>",
        eos_token=END_OF_UTTERANCE,
        pad_token="<|im_end|>",
        unk_token="<|endoftext|>",
    )
    fast.add_special_tokens({"additional_special_tokens": SMOLVLM_SPECIAL_TOKENS})
    fast.chat_template = SMOLVLM_CHAT_TEMPLATE
    return fast


def build_tiny_checkpoint(
    out_dir: str | Path,
    family: str = "256m",
    *,
    seed: int = 0,
    vision_hidden: int = 32,
    vision_layers: int = 2,
    text_hidden: int = 64,
    text_layers: int = 2,
    do_image_splitting: bool = True,
    tie_word_embeddings: bool = False,
) -> Path:
    """Write a complete tiny SmolVLM (Idefics3) checkpoint folder and return its path."""
    import torch
    from transformers import Idefics3Config, Idefics3ForConditionalGeneration

    fam = FAMILIES[family]
    tokenizer = build_tokenizer()
    processor = build_processor(tokenizer, fam, do_image_splitting=do_image_splitting)
    config = Idefics3Config(
        image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
        scale_factor=fam.scale_factor,
        tie_word_embeddings=tie_word_embeddings,
        vision_config={
            "hidden_size": vision_hidden,
            "intermediate_size": vision_hidden * 2,
            "num_hidden_layers": vision_layers,
            "num_attention_heads": 2,
            "image_size": fam.tile,
            "patch_size": fam.patch,
        },
        text_config={
            "model_type": "llama",
            "hidden_size": text_hidden,
            "intermediate_size": text_hidden * 2,
            "num_hidden_layers": text_layers,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "vocab_size": len(tokenizer),
            "max_position_embeddings": 8192,
            "rope_theta": 100000.0,
            "rms_norm_eps": 1e-5,
            "tie_word_embeddings": tie_word_embeddings,
            "bos_token_id": tokenizer.bos_token_id,
            "eos_token_id": tokenizer.eos_token_id,
            "pad_token_id": tokenizer.pad_token_id,
        },
    )
    torch.manual_seed(seed)
    model = Idefics3ForConditionalGeneration(config).eval()
    # Random init leaves norms at 1 and biases at 0; perturb every parameter a little so a wrong
    # weight mapping anywhere downstream changes the outputs instead of hiding behind symmetry.
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    out = save_checkpoint(model, processor, out_dir)
    (out / TINY_MARKER).write_text(
        json.dumps({"note": "tiny random-weight SmolVLM built offline; its answers are noise", "family": family})
    )
    return out


def build_processor(tokenizer, fam: Family, *, do_image_splitting: bool = True,
                    chat_template: str = SMOLVLM_CHAT_TEMPLATE):
    """The reference Idefics3 processor (PIL backend) with the family's SmolVLM image settings."""
    from PIL import Image
    from transformers import Idefics3ImageProcessorPil, Idefics3Processor

    image_processor = Idefics3ImageProcessorPil(
        do_resize=True,
        size={"longest_edge": fam.longest_edge},
        max_image_size={"longest_edge": fam.tile},
        do_image_splitting=do_image_splitting,
        resample=Image.Resampling.LANCZOS,
        do_rescale=True,
        rescale_factor=1 / 255,
        do_normalize=True,
        image_mean=[0.5, 0.5, 0.5],
        image_std=[0.5, 0.5, 0.5],
        do_pad=True,
        do_convert_rgb=True,
    )
    return Idefics3Processor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        image_seq_len=fam.image_seq_len,
        chat_template=chat_template,
    )


def save_checkpoint(model, processor, out_dir: str | Path) -> Path:
    """Save model and processor as a checkpoint folder in the Hub's layout; returns the folder."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    processor.save_pretrained(out)
    _write_hub_layout(out)
    return out


def _write_hub_layout(out: Path) -> None:
    """Lay the processor files out as the SmolVLM checkpoints on the Hub do.

    transformers 5 saves one nested processor_config.json; the published checkpoints have a flat
    preprocessor_config.json plus a processor_config.json holding only image_seq_len. Loaders must
    read the published layout, so the tiny model uses it too.
    """
    nested = json.loads((out / "processor_config.json").read_text())
    image_processor = dict(nested.pop("image_processor"))
    image_processor["processor_class"] = nested.get("processor_class", "Idefics3Processor")
    (out / "preprocessor_config.json").write_text(json.dumps(image_processor, indent=2))
    (out / "processor_config.json").write_text(json.dumps(nested, indent=2))
