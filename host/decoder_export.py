"""SmolVLM's text model as a standalone Llama-format Hugging Face folder.

rkllm-toolkit converts plain decoder-only checkpoints (`load_huggingface`), and the x86 emulation
decoder loads the same folder with `AutoModelForCausalLM`; neither knows Idefics3. SmolVLM's text
path is a stock `LlamaModel` + `lm_head` fed `inputs_embeds`, so its weights are copied unchanged
into a `LlamaForCausalLM` whose config is rebuilt from the text config (only the keys Llama knows:
SmolVLM's text config also carries perceiver/resampler leftovers that other readers may trip on).

The end-of-turn token becomes the EOS: the SmolVLM checkpoints' text config says eos = 2
(`<|im_end|>`), but the model ends its answers with `<end_of_utterance>`; a board that waits for the
wrong id never stops talking. The id is read off the chat template's end-of-turn piece through the
checkpoint's own tokenizer, never typed in code, and comes first in the EOS list
(host.bundle_writer.eos_token_ids merges the generation config's and the tokenizer's eos after it).

Tied embeddings stay tied (the config says so and `lm_head` is the embedding table, as in the
source); untied checkpoints get their own `lm_head.weight`. Weights keep the checkpoint's stored
dtype (bf16 for the published ones), so nothing is rounded on the way.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any, Optional, Sequence

from board.errors import InputError
from board.prompt import PromptFormat

# LlamaConfig fields carried over from SmolVLM's text config; the rest are Idefics3 leftovers.
_LLAMA_KEYS = (
    "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
    "num_key_value_heads", "head_dim", "hidden_act", "max_position_embeddings", "initializer_range",
    "rms_norm_eps", "rope_parameters", "attention_bias", "attention_dropout", "mlp_bias", "pretraining_tp",
)
_DTYPES = ("float32", "bfloat16", "float16")
EXPORT_INFO = "smolvlm_export.json"


def end_of_turn_token_id(fmt: PromptFormat, tokenizer: Any) -> int:
    """The id of the token that closes a turn: the first token of the template's end-of-turn piece."""
    ids = tokenizer.encode(fmt.end_of_turn, add_special_tokens=False)
    if not ids:
        raise InputError(f"the chat template's end of turn {fmt.end_of_turn!r} tokenizes to nothing")
    first = int(ids[0])
    if first not in set(tokenizer.all_special_ids) and tokenizer.convert_ids_to_tokens(first) not in (
        tokenizer.get_added_vocab() or {}
    ):
        raise InputError(
            f"the chat template ends turns with {fmt.end_of_turn!r}, which does not start with a special token",
            hint="this tool needs an end-of-turn token the decoder can stop on (SmolVLM: <end_of_utterance>)",
        )
    return first


def source_dtype(config: dict[str, Any]) -> str:
    """The dtype the checkpoint's weights are stored in (config 'dtype' / 'torch_dtype'), float32 if unknown."""
    dtype = str(config.get("dtype") or config.get("torch_dtype") or "float32")
    return dtype if dtype in _DTYPES else "float32"


def llama_config(text_config: Any, *, tie_word_embeddings: bool, eos_ids: Sequence[int], bos_id: Optional[int],
                 pad_id: Optional[int], dtype: str) -> Any:
    """A clean LlamaConfig from the SmolVLM model's text config (a transformers LlamaConfig)."""
    from transformers import LlamaConfig

    source = text_config.to_dict()
    kwargs = {key: source[key] for key in _LLAMA_KEYS if source.get(key) is not None}
    return LlamaConfig(
        **kwargs,
        tie_word_embeddings=tie_word_embeddings,
        bos_token_id=bos_id,
        eos_token_id=eos_ids[0] if len(eos_ids) == 1 else list(eos_ids),
        pad_token_id=pad_id,
        architectures=["LlamaForCausalLM"],
        dtype=dtype,
    )


def _is_tied(model: Any) -> bool:
    import torch

    embed = model.model.text_model.embed_tokens.weight
    head = model.lm_head.weight
    return head.data_ptr() == embed.data_ptr() or (head.shape == embed.shape and bool(torch.equal(head, embed)))


def export_decoder(model: Any, tokenizer: Any, out_dir: str | Path, *, eos_ids: Sequence[int],
                   dtype: str = "float32", source: Optional[dict[str, Any]] = None) -> dict[str, Any]:
    """Write the text model of a loaded SmolVLM (Idefics3ForConditionalGeneration) as a LlamaForCausalLM folder.

    Returns what was written (also saved as smolvlm_export.json in the folder, for diagnosis).
    """
    import torch
    from transformers import GenerationConfig, LlamaForCausalLM

    if not eos_ids:
        raise InputError("no end-of-turn token id: the decoder would never stop")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tied = _is_tied(model)
    text_model = model.model.text_model
    config = llama_config(
        text_model.config, tie_word_embeddings=tied, eos_ids=eos_ids,
        bos_id=tokenizer.bos_token_id, pad_id=tokenizer.pad_token_id, dtype=dtype,
    )
    # copies in the target dtype: the source model must stay untouched (it is still in use)
    target = getattr(torch, dtype)
    state = {f"model.{k}": v.detach().to(target, copy=True) for k, v in text_model.state_dict().items()}
    state["lm_head.weight"] = model.lm_head.weight.detach().to(target, copy=True)
    with torch.device("meta"):
        llama = LlamaForCausalLM(config)
    llama.load_state_dict(state, strict=True, assign=True)
    if tied:
        llama.tie_weights()
    llama.generation_config = GenerationConfig(
        bos_token_id=config.bos_token_id, eos_token_id=config.eos_token_id, pad_token_id=config.pad_token_id,
    )
    llama.save_pretrained(out)
    # rope_theta at the top level too: readers written for transformers 4 configs look for it there
    config_path = out / "config.json"
    written = json.loads(config_path.read_text())
    written["rope_theta"] = written["rope_parameters"]["rope_theta"]
    config_path.write_text(json.dumps(written, indent=2) + "\n")

    eos_token = tokenizer.convert_ids_to_tokens(int(eos_ids[0]))
    if tokenizer.eos_token != eos_token:
        tokenizer = copy.deepcopy(tokenizer)
        tokenizer.eos_token = eos_token
    tokenizer.save_pretrained(out)
    info = {
        "source": source or {},
        "architecture": "LlamaForCausalLM",
        "dtype": dtype,
        "tie_word_embeddings": tied,
        "eos_token_ids": [int(i) for i in eos_ids],
        "eos_token": eos_token,
        "hidden_size": int(config.hidden_size),
        "vocab_size": int(config.vocab_size),
        "num_hidden_layers": int(config.num_hidden_layers),
        "max_position_embeddings": int(config.max_position_embeddings),
    }
    (out / EXPORT_INFO).write_text(json.dumps(info, indent=2) + "\n")
    return info


def load_decoder(folder: str | Path, dtype: str = "float32") -> Any:
    """The exported folder as transformers loads it for anyone (AutoModelForCausalLM), in eval mode."""
    import torch
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(folder, dtype=getattr(torch, dtype)).eval()


def text_path_logits(model: Any, embeds: Any) -> Any:
    """Logits of SmolVLM's own text path (text model + lm_head) for inputs_embeds [1, n, hidden]."""
    import torch

    with torch.no_grad():
        hidden = model.model.text_model(inputs_embeds=embeds).last_hidden_state
        return model.lm_head(hidden)


def compare_logits(model: Any, decoder: Any, embeds: Any) -> dict[str, float]:
    """Max abs difference between the SmolVLM text path and the standalone decoder on the same embeddings."""
    import torch

    expected = text_path_logits(model, embeds).float()
    with torch.no_grad():
        actual = decoder(inputs_embeds=embeds.to(decoder.dtype)).logits.float()
    return {
        "max_abs_diff": float((actual - expected).abs().max()),
        "ref_max_abs": float(expected.abs().max()),
        "argmax_agreement": float((actual.argmax(-1) == expected.argmax(-1)).float().mean()),
        "tokens": int(embeds.shape[1]),
    }
