"""The extracted decoder folder is a plain Llama checkpoint that computes exactly SmolVLM's text path."""

from __future__ import annotations

import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from host.bundle_writer import eos_token_ids  # noqa: E402
from host.checkpoint import load_checkpoint  # noqa: E402
from host.decoder_export import (  # noqa: E402
    compare_logits, end_of_turn_token_id, export_decoder, llama_config, load_decoder, source_dtype, text_path_logits,
)
from host.prompt_format import prompt_format_from_processor  # noqa: E402


def _export(checkpoint_dir, out):
    ck = load_checkpoint(checkpoint_dir)
    processor = ck.load_processor()
    fmt = prompt_format_from_processor(processor, ck.chat_template)
    eot = end_of_turn_token_id(fmt, processor.tokenizer)
    model = ck.load_model()
    info = export_decoder(model, processor.tokenizer, out, eos_ids=eos_token_ids(ck, processor.tokenizer, eot),
                          dtype=source_dtype(ck.config))
    return ck, processor, model, info


@pytest.fixture(scope="module", params=[("256m", False), ("256m", True), ("2.2b", False), ("2.2b", True)],
                ids=lambda p: f"{p[0]}-{'tied' if p[1] else 'untied'}")
def exported(request, tiny_checkpoint, tmp_path_factory):
    family, tied = request.param
    out = tmp_path_factory.mktemp(f"decoder-{family}-{tied}")
    ck, processor, model, info = _export(tiny_checkpoint(family, tie_word_embeddings=tied), out)
    return {"ck": ck, "processor": processor, "model": model, "info": info, "out": out, "tied": tied}


def test_logits_equal_smolvlm_text_path(exported):
    model = exported["model"]
    decoder = load_decoder(exported["out"])  # AutoModelForCausalLM, as the emulation decoder loads it
    assert type(decoder).__name__ == "LlamaForCausalLM"
    hidden = model.config.text_config.hidden_size
    generator = torch.Generator().manual_seed(1)
    for n in (1, 7, 300):
        embeds = torch.randn(1, n, hidden, generator=generator) * 0.05
        expected = text_path_logits(model, embeds)
        with torch.no_grad():
            actual = decoder(inputs_embeds=embeds).logits
        assert float((actual - expected).abs().max()) <= 1e-5
    # real rows of the embedding table (a text prompt), as the board feeds them
    ids = torch.tensor([exported["processor"].tokenizer.encode("User: What is in this image?")])
    report = compare_logits(model, decoder, model.model.text_model.embed_tokens(ids).detach())
    assert report["max_abs_diff"] <= 1e-5 and report["argmax_agreement"] == 1.0


def test_generation_matches_reference_greedy(exported):
    """Greedy decoding from the same embeddings gives the same tokens (cache path included)."""
    model, decoder = exported["model"], load_decoder(exported["out"])
    tokenizer = exported["processor"].tokenizer
    ids = torch.tensor([tokenizer.encode("<|im_start|>User: Hello there.<end_of_utterance>\nAssistant:")])
    embeds = model.model.text_model.embed_tokens(ids).detach()
    with torch.no_grad():
        out = decoder.generate(inputs_embeds=embeds, max_new_tokens=6, do_sample=False, eos_token_id=None,
                               pad_token_id=0, min_new_tokens=6)
        seq, expected = embeds, []
        for _ in range(6):
            token = int(text_path_logits(model, seq)[0, -1].argmax())
            expected.append(token)
            seq = torch.cat([seq, model.model.text_model.embed_tokens(torch.tensor([[token]]))], dim=1)
    assert out[0].tolist() == expected


def test_config_and_files(exported):
    out, ck, tokenizer = exported["out"], exported["ck"], exported["processor"].tokenizer
    config = json.loads((out / "config.json").read_text())
    text = ck.text_config
    eot = tokenizer.convert_tokens_to_ids("<end_of_utterance>")
    assert config["architectures"] == ["LlamaForCausalLM"] and config["model_type"] == "llama"
    for key in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "vocab_size", "max_position_embeddings", "rms_norm_eps"):
        assert config[key] == text[key], key
    assert config["head_dim"] == text["hidden_size"] // text["num_attention_heads"]
    # transformers 5 writes rope_parameters, the published configs rope_theta: the folder has both
    theta = text.get("rope_theta") or text["rope_parameters"]["rope_theta"]
    assert config["rope_theta"] == config["rope_parameters"]["rope_theta"] == theta
    assert config["tie_word_embeddings"] is exported["tied"]
    # EOS: the end-of-turn token, read through the tokenizer (the text config's own eos is not it)
    assert config["eos_token_id"] == eot == exported["info"]["eos_token_ids"][0]
    generation = json.loads((out / "generation_config.json").read_text())
    assert generation["eos_token_id"] == eot
    # no Idefics3 leftovers that other readers may trip on
    assert not {"perceiver_config", "pixel_shuffle_factor", "use_resampler", "vision_config"} & set(config)

    from safetensors import safe_open

    with safe_open(str(out / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
    assert "model.embed_tokens.weight" in keys and "model.norm.weight" in keys
    # untied: its own lm_head; tied: lm_head is the embedding table, as transformers stores tied models
    assert ("lm_head.weight" in keys) is (not exported["tied"])
    decoder = load_decoder(out)
    assert torch.equal(decoder.lm_head.weight, exported["model"].lm_head.weight)


def test_tokenizer_in_folder_has_smolvlm_specials(exported):
    from transformers import AutoTokenizer

    ours = AutoTokenizer.from_pretrained(exported["out"])
    reference = exported["processor"].tokenizer
    assert ours.eos_token == "<end_of_utterance>"
    text = "<|im_start|>User:<fake_token_around_image><global-img><image><image><end_of_utterance>\nAssistant: hi"
    assert ours.encode(text) == reference.encode(text)
    assert len(ours) == len(reference)


def test_eos_list_keeps_end_of_turn_first_with_an_old_generation_config(tiny_checkpoint, tmp_path):
    """An early SmolVLM upload's generation config said eos = <|im_end|>: it stays an extra stop, second."""
    import shutil

    folder = tmp_path / "old-upload"
    shutil.copytree(tiny_checkpoint("256m"), folder)
    gen = json.loads((folder / "generation_config.json").read_text())
    gen["eos_token_id"] = 2
    (folder / "generation_config.json").write_text(json.dumps(gen))
    ck, processor, _, info = _export(folder, tmp_path / "decoder")
    eot = processor.tokenizer.convert_tokens_to_ids("<end_of_utterance>")
    assert info["eos_token_ids"][0] == eot and 2 in info["eos_token_ids"]
    config = json.loads((tmp_path / "decoder" / "config.json").read_text())
    assert config["eos_token_id"][0] == eot


def test_llama_config_keeps_only_llama_keys(tiny_checkpoint):
    ck = load_checkpoint(tiny_checkpoint("256m"))
    from transformers import Idefics3Config

    config = Idefics3Config.from_pretrained(ck.path)
    config.text_config.perceiver_config = {"resampler_n_latents": 64}  # as the published configs carry
    llama = llama_config(config.text_config, tie_word_embeddings=False, eos_ids=[5], bos_id=1, pad_id=2,
                         dtype="bfloat16")
    assert not hasattr(llama, "perceiver_config")
    assert llama.eos_token_id == 5 and llama.rope_parameters["rope_theta"] == 100000.0


def test_bf16_checkpoint_is_saved_as_bf16_without_rounding(tiny_checkpoint, tmp_path):
    """The published checkpoints are bf16: the folder keeps bf16, and fp32 logits still match exactly."""
    import shutil

    folder = tmp_path / "bf16"
    shutil.copytree(tiny_checkpoint("256m"), folder)
    ck = load_checkpoint(folder)
    model = ck.load_model(dtype="bfloat16")
    model.save_pretrained(folder)
    ck, processor, model, info = _export(folder, tmp_path / "decoder")
    assert info["dtype"] == "bfloat16"
    config = json.loads((tmp_path / "decoder" / "config.json").read_text())
    assert config["dtype"] == "bfloat16"
    decoder = load_decoder(tmp_path / "decoder")
    embeds = torch.from_numpy(np.random.default_rng(0).normal(0, 0.05, (1, 20, 64)).astype(np.float32))
    assert compare_logits(model, decoder, embeds)["max_abs_diff"] <= 1e-5
