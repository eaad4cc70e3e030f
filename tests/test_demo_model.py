"""host.demo_model: SmolLM2-135M-Instruct's real language weights in SmolVLM-256M's geometry, and what a
real language model lets the tests check that random weights cannot.

The weights are checked by logits, not by reading text (a missing Q/K un-permutation still gives
half-plausible English): an independent numpy forward pass written here follows llama.cpp's own
semantics on the GGUF's tensors *as stored* (rotary on adjacent pairs of the permuted rows), after the
GGUF's quantized blocks are decoded by hand from their documented layout. Then, on the bundle that
`host.convert --skip-decoder` makes of the demo model, in emulation: answers stop at the end-of-turn
token on their own, are right on simple questions, equal transformers' greedy generate() token for
token, stream whole UTF-8 characters, and are cut by stop strings; and no warning reaches stderr.
"""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest

pytest.importorskip("torch")
pytest.importorskip("onnxruntime")
from support import Oracle, convert_bundle, run_cli, skip_without_rknn_toolkit  # noqa: E402

from board.decoder import SamplingParams  # noqa: E402
from board.pipeline import Pipeline  # noqa: E402

# rknn-toolkit2 imports pkg_resources (the conversion CLI silences it; here pytest would show it)
pytestmark = pytest.mark.filterwarnings("ignore:pkg_resources is deprecated:UserWarning")

CAPITAL = "What is the capital of France?"


def user(text: str, image: bool = False) -> list[dict]:
    return [{"role": "user", "content": ([{"type": "image"}] if image else []) + [{"type": "text", "text": text}]}]


@pytest.fixture(scope="module")
def gguf(demo_checkpoint):
    from host.demo_model import read_gguf

    return read_gguf()


@pytest.fixture(scope="module")
def bundle(demo_checkpoint, tmp_path_factory):
    skip_without_rknn_toolkit()
    return convert_bundle(demo_checkpoint, tmp_path_factory.mktemp("demo-bundle") / "bundle")


@pytest.fixture(scope="module")
def pipeline(bundle):
    with Pipeline(bundle, emulate=True) as p:
        yield p


# -- the weights, checked against the GGUF by an independent path ----------------------------------


def _f16(raw: np.ndarray) -> np.ndarray:
    return raw.copy().view(np.float16).astype(np.float32)


def test_quantized_blocks_decode_as_documented(gguf):
    """ggml's block layouts, decoded by hand: Q8_0 = f16 scale + 32 int8; Q4_1 = f16 scale, f16 min,
    16 bytes of nibbles (low nibbles are values 0-15, high nibbles 16-31); value = scale * q (+ min)."""
    from gguf import GGUFReader

    from host.demo_model import gguf_path

    raw = {t.name: t for t in GGUFReader(str(gguf_path())).tensors}
    q8 = raw["token_embd.weight"]
    assert q8.tensor_type.name == "Q8_0"
    blocks = np.asarray(q8.data[:100]).reshape(100, -1, 34)  # the first 100 rows
    mine = (_f16(blocks[..., :2]) * blocks[..., 2:].view(np.int8)).reshape(100, -1)
    assert np.array_equal(mine, gguf.tensors["token_embd.weight"][:100])

    q4 = raw["blk.0.attn_q.weight"]
    assert q4.tensor_type.name == "Q4_1"
    blocks = np.asarray(q4.data).reshape(q4.data.shape[0], -1, 20)
    nibbles = blocks[..., 4:]
    q = np.concatenate([nibbles & 0x0F, nibbles >> 4], -1).astype(np.float32)
    mine = (_f16(blocks[..., 0:2]) * q + _f16(blocks[..., 2:4])).reshape(q4.data.shape[0], -1)
    assert np.allclose(mine, gguf.tensors["blk.0.attn_q.weight"], rtol=0, atol=1e-6)


def llama_cpp_logits(g, ids: list[int]) -> np.ndarray:
    """Logits of the GGUF's llama graph as llama.cpp computes it, in float64, on the tensors as stored.

    llama.cpp's llama arch uses rope mode NORM: each head's q/k rows come in adjacent pairs (2i, 2i+1)
    rotated by pos * base^(-2i/d) (the converter permuted the rows for that). RMSNorm x/sqrt(mean(x^2)+eps)*w,
    grouped-query attention (query head h reads KV head h // (heads / kv_heads)), SwiGLU, tied output.
    """
    heads, kv_heads = int(g.meta("attention.head_count")), int(g.meta("attention.head_count_kv"))
    eps, base = float(g.meta("attention.layer_norm_rms_epsilon")), float(g.meta("rope.freq_base"))
    t = {k: v.astype(np.float64) for k, v in g.tensors.items()}
    x = t["token_embd.weight"][ids]
    n, d = x.shape
    hd = d // heads
    angle = np.arange(n)[:, None] * base ** (-np.arange(0, hd, 2) / hd)[None]
    cos, sin = np.cos(angle)[:, None], np.sin(angle)[:, None]

    def norm(v, w):
        return v / np.sqrt((v * v).mean(-1, keepdims=True) + eps) * w

    def rope(v):
        even, odd = v[..., 0::2], v[..., 1::2]
        out = np.empty_like(v)
        out[..., 0::2], out[..., 1::2] = even * cos - odd * sin, even * sin + odd * cos
        return out

    causal = np.triu(np.full((n, n), -np.inf), 1)
    for i in range(int(g.meta("block_count"))):
        w = {k.split(".", 2)[2][:-7]: v for k, v in t.items() if k.startswith(f"blk.{i}.")}
        h = norm(x, w["attn_norm"])
        q = rope((h @ w["attn_q"].T).reshape(n, heads, hd))
        k = np.repeat(rope((h @ w["attn_k"].T).reshape(n, kv_heads, hd)), heads // kv_heads, 1)
        v = np.repeat((h @ w["attn_v"].T).reshape(n, kv_heads, hd), heads // kv_heads, 1)
        s = np.einsum("qhd,khd->hqk", q, k) / np.sqrt(hd) + causal
        p = np.exp(s - s.max(-1, keepdims=True))
        p /= p.sum(-1, keepdims=True)
        x = x + np.einsum("hqk,khd->qhd", p, v).reshape(n, d) @ w["attn_output"].T
        h = norm(x, w["ffn_norm"])
        gate = h @ w["ffn_gate"].T
        x = x + (gate / (1 + np.exp(-gate)) * (h @ w["ffn_up"].T)) @ w["ffn_down"].T
    return norm(x, t["output_norm.weight"]) @ t["token_embd.weight"].T


def _cosine(a: np.ndarray, b: np.ndarray) -> float:
    return float((a * b).sum() / np.linalg.norm(a) / np.linalg.norm(b))


def test_logits_equal_llama_cpp_and_need_the_qk_unpermutation(demo_checkpoint, gguf):
    """The checkpoint's text path gives llama.cpp's logits; with the Q/K rows as stored it would not."""
    import torch

    from host.checkpoint import load_checkpoint
    from host.decoder_export import text_path_logits

    ck = load_checkpoint(demo_checkpoint)
    tokenizer, model = ck.load_tokenizer(), ck.load_model()
    # SmolLM2's own ChatML turn: only tokens the GGUF has (the SmolVLM layout's <end_of_utterance> is added)
    ids = tokenizer(f"<|im_start|>user\n{CAPITAL}<|im_end|>\n<|im_start|>assistant\n")["input_ids"]
    reference = llama_cpp_logits(gguf, ids)
    embeds = model.get_input_embeddings()(torch.tensor([ids]))
    ours = text_path_logits(model, embeds)[0].double().numpy()[:, : reference.shape[1]]
    assert _cosine(ours.ravel(), reference.ravel()) > 0.99999
    assert np.abs(ours - reference).max() < 1e-2 * np.abs(reference).max()
    assert (ours.argmax(-1) == reference.argmax(-1)).all()

    with torch.no_grad():  # the same model with llama.cpp's row order left in place
        for i, layer in enumerate(model.model.text_model.layers):
            layer.self_attn.q_proj.weight.copy_(torch.from_numpy(gguf.tensors[f"blk.{i}.attn_q.weight"]))
            layer.self_attn.k_proj.weight.copy_(torch.from_numpy(gguf.tensors[f"blk.{i}.attn_k.weight"]))
    permuted = text_path_logits(model, embeds)[0].double().numpy()[:, : reference.shape[1]]
    assert _cosine(permuted.ravel(), reference.ravel()) < 0.9
    assert (permuted.argmax(-1) == reference.argmax(-1)).mean() < 0.75


def test_vocabulary_and_added_rows(demo_checkpoint, gguf):
    """SmolVLM's tokens at their real ids, the GGUF's BPE (real merges, single digits), sensible new rows."""
    from safetensors import safe_open

    from host import demo_model as D
    from host.checkpoint import load_checkpoint

    ck = load_checkpoint(demo_checkpoint)
    tok = ck.load_tokenizer()
    assert len(tok) == ck.text_config["vocab_size"] == D.VOCAB_SIZE
    expected = {"<global-img>": 49152, "<row_1_col_1>": 49153, "<row_6_col_6>": 49188,
                "<fake_token_around_image>": 49189, "<image>": 49190, "<end_of_utterance>": 49279,
                "<|im_start|>": 1, "<|im_end|>": 2}
    assert {t: tok.convert_tokens_to_ids(t) for t in expected} == expected
    assert ck.config["image_token_id"] == 49190
    assert tok.tokenize(" Paris") == ["ĠParis"] and tok.tokenize("2024") == ["2", "0", "2", "4"]
    text = "Café naïve – 日本語 ✓ 😀"
    assert tok.decode(tok(text, add_special_tokens=False)["input_ids"]) == text

    with safe_open(str(demo_checkpoint / "model.safetensors"), "np") as f:
        table = f.get_tensor("model.text_model.embed_tokens.weight")
    base = gguf.tensors["token_embd.weight"]
    assert D.DEFAULT_TEMPLATE == "smolvlm" and np.array_equal(table[: len(base)], base)
    assert np.allclose(table[49279], base[2] * D.EOU_SCALE)  # <end_of_utterance> plays <|im_end|>'s part
    assert np.allclose(table[49152:49279], base.mean(0), atol=1e-6)


def test_both_templates_pass_the_prompt_format_checks(gguf):
    """ChatML and SmolVLM's layout both derive a board PromptFormat that reproduces the template."""
    from host import demo_model as D
    from host.prompt_format import prompt_format_from_processor
    from host.tiny_model import FAMILIES, build_processor

    formats = {}
    for template, source in D.TEMPLATES.items():
        processor = build_processor(D.build_tokenizer(gguf, template), FAMILIES["256m"], chat_template=source)
        formats[template] = prompt_format_from_processor(processor, source)  # raises if it cannot reproduce it
    assert formats["chatml"].roles["user"] == ("<|im_start|>user\n", "<|im_start|>user\n")
    assert (formats["chatml"].end_of_turn, formats["chatml"].generation_prompt) == ("<|im_end|>\n", "<|im_start|>assistant\n")
    assert formats["smolvlm"].roles["user"] == ("User: ", "User:")
    assert formats["smolvlm"].end_of_turn == "<end_of_utterance>\n"


def test_labelled_in_config_card_and_manifest(demo_checkpoint, bundle):
    from host.demo_model import LABEL

    assert json.loads((demo_checkpoint / "config.json").read_text())["demo_model_note"] == LABEL
    assert LABEL in (demo_checkpoint / "README.md").read_text()
    manifest = json.loads((bundle / "manifest.json").read_text())
    assert manifest["model"]["note"] == LABEL and manifest["model"]["tiny"] is False
    assert "Warning" not in (demo_checkpoint.parent / "demo_build.log").read_text()


def test_cli_refuses_a_folder_that_is_not_a_demo_model(tmp_path):
    from host import demo_model as D

    (tmp_path / "precious.txt").write_text("keep me")
    assert D.main([str(tmp_path)]) == 1
    assert (tmp_path / "precious.txt").read_text() == "keep me"


# -- what a real language model makes testable, in emulation ----------------------------------------


def test_answers_are_right_and_stop_by_themselves(pipeline):
    """Simple factual questions (capitals, opposites, colours): right, and ended by the end-of-turn token."""
    end_of_utterance = pipeline.tokenizer.token_to_id("<end_of_utterance>")
    for question, word in ((CAPITAL, "Paris"), ("What is the capital of Japan?", "Tokyo"),
                           ("What is the opposite of hot?", "cold"), ("What color is grass?", "green")):
        answer = pipeline.generate(user(question), sampling=SamplingParams(max_new_tokens=48)).collect()
        assert answer.finish_reason == "stop", (question, answer.text)
        assert answer.token_ids[-1] == end_of_utterance == pipeline.bundle.eos_token_ids[0]  # as a real SmolVLM ends
        assert word in answer.text, (question, answer.text)


def test_greedy_tokens_equal_transformers_on_real_weights(pipeline, demo_checkpoint, images):
    oracle = Oracle(demo_checkpoint)
    for messages, image_paths in ((user(CAPITAL), []), (user("What is in this image?", image=True), [images["small"]])):
        reply = pipeline.generate(messages, image_paths, sampling=SamplingParams(max_new_tokens=24))
        answer = reply.collect()
        inputs = oracle.inputs(messages, image_paths)
        assert reply.prompt.input_ids.tolist() == inputs["input_ids"][0].tolist()
        assert answer.token_ids == oracle.generate(inputs, 24)


def test_streamed_pieces_are_whole_utf8_characters(pipeline):
    """Real multi-byte text split over byte-level tokens: no piece ends inside a character."""
    from board.decoder_torch import IncrementalDetokenizer

    tokenizer = pipeline.tokenizer
    text = "Grüße aus Köln — 東京 ✓ 😀 ok"
    ids = tokenizer.encode(text, add_special_tokens=False).ids
    assert len(ids) > len(text.encode()) // 4  # the emoji and CJK take several byte tokens each
    detok = IncrementalDetokenizer(tokenizer)
    pieces = [detok.add(i) for i in ids] + [detok.flush()]
    assert "".join(pieces) == text and not any("\ufffd" in p for p in pieces)

    steps = list(pipeline.generate(user("How do you say 'hello' in Japanese?"), sampling=SamplingParams(max_new_tokens=24)))
    answer_ids = [s.token_id for s in steps if s.token_id is not None]
    whole = tokenizer.decode(answer_ids, skip_special_tokens=True)
    assert "".join(s.text for s in steps) == whole
    assert not any("\ufffd" in s.text for s in steps) and any(ord(c) > 127 for c in whole)


def test_stop_strings_cut_a_real_answer(pipeline):
    """The server's worker with a stop string that spans tokens: cut before it, finish 'stop', generation aborted."""
    import multiprocessing
    import threading

    from board.openai_schemas import Limits, parse_chat_request
    from board.serve_worker import Finished, Run, Stop, Text, _ChildWorker

    full = pipeline.generate(user(CAPITAL), sampling=SamplingParams(max_new_tokens=48)).collect()
    assert "France is Paris" in full.text
    server_end, worker_end = multiprocessing.Pipe()
    worker = threading.Thread(target=_ChildWorker(pipeline, worker_end).run, daemon=True)  # in-process, same protocol
    worker.start()
    try:
        server_end.recv()  # Loaded
        body = {"model": "m", "messages": [{"role": "user", "content": CAPITAL}], "stop": ["is Par"], "max_tokens": 48}
        server_end.send(Run(1, parse_chat_request(body, default_sampling=SamplingParams(), limits=Limits())))
        events = [server_end.recv()]
        while not isinstance(events[-1], Finished):
            assert server_end.poll(120), events
            events.append(server_end.recv())
    finally:
        server_end.send(Stop())
        worker.join(60)
    text = "".join(e.text for e in events if isinstance(e, Text))
    assert text == full.text.lstrip(" ")[: full.text.lstrip(" ").find("is Par")]
    assert events[-1].finish_reason == "stop"
    assert events[-1].completion_tokens < len(full.token_ids)


def test_emulation_raises_no_warnings(pipeline):
    """The decoder passes its KV cache the current way (no FutureWarning about past_key_values)."""
    from board.decoder_torch import cache_argument

    assert cache_argument(pipeline.decoder.model) == "cache"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        pipeline.generate(user(CAPITAL), sampling=SamplingParams(max_new_tokens=4)).collect()


def test_run_cli_answers_with_a_clean_stderr(bundle):
    result = run_cli("--bundle", str(bundle), "--emulate", "--max-new-tokens", "48", CAPITAL)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "Paris" in result.stdout
    assert result.stderr.strip() == "", result.stderr[-2000:]
