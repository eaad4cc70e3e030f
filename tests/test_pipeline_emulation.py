"""The whole board pipeline in emulation (ONNX Runtime vision + PyTorch decoder on the bundle's host/ files)
against transformers' own Idefics3 processor and generate() on the same tiny random-weight checkpoint.

Greedy token ids must be equal: single image, two images, interleaved images, no image, a tile
budget, and second chat turns (after the end-of-turn token, after max_new_tokens, after an abort).
"""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest

pytest.importorskip("torch")
pytest.importorskip("onnxruntime")

from board.bundle import Bundle  # noqa: E402
from board.decoder import GenerationResult, SamplingParams  # noqa: E402
from board.errors import DecoderError, PromptError  # noqa: E402
from board.pipeline import ContextFull, Pipeline  # noqa: E402
from board.sequence import build_sequence, stack_rows  # noqa: E402
from board.tiles import TilePlan, budget_settings, plan_tiles  # noqa: E402
from board.vision import EncodedImage, VisionCache  # noqa: E402
from support import CHAT_QUESTION as Q  # noqa: E402
from support import Oracle, stopping_video_setup, tiny_bundle_for  # noqa: E402

MAX_NEW = 16
GREEDY = SamplingParams(max_new_tokens=MAX_NEW)
MARK = "\x1fanswer\x1f"


def user(*items):
    return {"role": "user", "content": [{"type": "image"} if i is None else {"type": "text", "text": i} for i in items]}


@pytest.fixture(scope="module")
def base(tmp_path_factory, tiny_checkpoint):
    bundle = tiny_bundle_for(tmp_path_factory, tiny_checkpoint, "256m")
    with Pipeline(bundle, emulate=True) as pipeline:
        yield SimpleNamespace(bundle=bundle, pipeline=pipeline, oracle=Oracle(tiny_checkpoint("256m")))


@pytest.fixture(scope="module")
def stopping(images, tmp_path_factory, tiny_checkpoint):
    """A checkpoint whose greedy answer to the first chat turn ends with <end_of_utterance> after 3 tokens."""
    variant = stopping_video_setup(tmp_path_factory, tiny_checkpoint, images["wide"])
    with Pipeline(variant.bundle, emulate=True) as pipeline:
        yield SimpleNamespace(bundle=variant.bundle, pipeline=pipeline, oracle=Oracle(variant.checkpoint))


def _check_parity(setup, reply, messages, image_paths, max_new=MAX_NEW):
    answer = reply.collect()
    inputs = setup.oracle.inputs(messages, image_paths)
    assert reply.prompt.input_ids.tolist() == inputs["input_ids"][0].tolist()
    expected = setup.oracle.generate(inputs, max_new)
    assert answer.token_ids == expected
    assert answer.finish_reason == ("stop" if expected[-1] in setup.pipeline.eos_token_ids else "length")
    return answer


@pytest.mark.parametrize("names", [["wide"], ["wide", "tall"], []], ids=["one-image", "two-images", "no-image"])
def test_ask_greedy_tokens_equal_reference(base, images, names):
    paths = [images[n] for n in names]
    question = Q if paths else "Tell me a joke.\n\nA short one."
    reply = base.pipeline.ask(question, paths, sampling=GREEDY)
    answer = _check_parity(base, reply, [user(*[None] * len(paths), question)], paths)
    t = answer.timings
    assert answer.tiles_per_image == [13] * len(paths)
    assert t.tiles == 13 * len(paths) == t.vision_tiles + 13 * t.images_cached and t.prompt_tokens == len(reply.prompt)
    assert t.prefill_ms > 0 and t.ttft_ms > 0 and t.total_ms >= t.ttft_ms and t.peak_rss_mb > 0


def test_the_384_tile_geometry(tmp_path_factory, tiny_checkpoint, images):
    """The 2.2B family's geometry (384 tiles, 27x27 patches, pixel-shuffle 3, 81 rows per tile)."""
    bundle = tiny_bundle_for(tmp_path_factory, tiny_checkpoint, "2.2b")
    with Pipeline(bundle, emulate=True) as pipeline:
        setup = SimpleNamespace(pipeline=pipeline, oracle=Oracle(tiny_checkpoint("2.2b")))
        reply = pipeline.ask(Q, [images["wide"]], sampling=GREEDY)
        answer = _check_parity(setup, reply, [user(None, Q)], [images["wide"]])
    assert answer.tiles_per_image == [13] and len(reply.prompt.image_positions) == 13 * 81


def test_interleaved_images_and_system_message(base, images):
    messages = [{"role": "system", "content": [{"type": "text", "text": "Answer briefly."}]},
                user("Compare", None, "with", None, "please.")]
    paths = [images["small"], images["tall"]]
    _check_parity(base, base.pipeline.generate(messages, paths, sampling=GREEDY), messages, paths)


def test_tile_budget_equals_reference_with_a_smaller_longest_edge(base, images):
    reply = base.pipeline.ask(Q, [images["wide"]], sampling=GREEDY, max_tiles=5)
    answer = reply.collect()
    assert answer.tiles_per_image == [5]
    inputs = base.oracle.inputs([user(None, Q)], [images["wide"]], size={"longest_edge": 1024})
    assert reply.prompt.input_ids.tolist() == inputs["input_ids"][0].tolist()
    assert answer.token_ids == base.oracle.generate(inputs, MAX_NEW)
    assert base.pipeline.ask(Q, [images["wide"]], max_tiles=1, sampling=GREEDY).collect().tiles_per_image == [1]


def test_budget_settings_pick_the_largest_grid_within_budget(base):
    settings = base.pipeline.settings
    for max_tiles, expected in [(None, 13), (17, 13), (13, 13), (12, 7), (7, 7), (6, 5), (5, 5), (4, 1), (1, 1)]:
        chosen = budget_settings(settings, 600, 900, max_tiles)
        assert plan_tiles(600, 900, chosen).n_tiles == expected, max_tiles


def test_sequence_equals_reference_inputs_embeds(base, images):
    """Text rows from the fp16 table and ONNX vision rows at the <image> slots vs the reference's merge."""
    pipeline, paths = base.pipeline, [images["wide"], images["small"]]
    messages = [user(None, "Compare with", None)]
    encoded = [pipeline.encode_image(p, pipeline.begin_turn().timings) for p in paths]
    prompt = pipeline.full_prompt(messages, encoded)
    ours = build_sequence(prompt, pipeline.table, stack_rows([e.rows for e in encoded], pipeline.table.shape[1]))
    ref = base.oracle.inputs_embeds(base.oracle.inputs(messages, paths))
    assert ours.shape == ref.shape and ours.dtype == np.float32
    cos = (ours * ref).sum(1) / (np.linalg.norm(ours, axis=1) * np.linalg.norm(ref, axis=1))
    image_rows = prompt.image_positions
    text_rows = np.setdiff1d(np.arange(len(prompt)), image_rows)
    # text rows differ only by the table's fp16 rounding; image rows by ONNX Runtime vs PyTorch arithmetic
    # (< 1e-5 on identical tiles) and by the tiles: float32 resampling puts a rare pixel one level off
    # Pillow's (board.resample), which moves a row by up to ~1.5e-3 here (|rows| up to 2.8)
    assert cos.min() > 0.99999
    assert np.abs(ours[text_rows] - ref[text_rows]).max() <= np.abs(ref[text_rows]).max() * 2**-10
    image_diff = np.abs(ours[image_rows] - ref[image_rows])
    assert image_diff.mean() < 1e-4 and image_diff.max() < 5e-3


def test_sequence_count_check(base):
    pipeline = base.pipeline
    prompt = pipeline.full_prompt([user(None, Q)], [EncodedImage(TilePlan((512, 512), (512, 512), (512, 512), 0, 0, 512), None)])
    hidden = pipeline.table.shape[1]
    with pytest.raises(PromptError, match="64 image slots but the vision encoder gave 63 rows"):
        build_sequence(prompt, pipeline.table, np.zeros((63, hidden), np.float32))
    with pytest.raises(PromptError, match="hidden size"):
        build_sequence(prompt, pipeline.table, np.zeros((64, hidden + 1), np.float32))


def test_vision_cache_hits_skip_encoding(base, images):
    pipeline = base.pipeline
    pipeline.cache.clear()
    first = pipeline.ask(Q, [images["tall"]], sampling=GREEDY).collect()
    again = pipeline.ask(Q, [images["tall"]], sampling=GREEDY).collect()
    assert (first.timings.images_cached, first.timings.vision_tiles) == (0, 13)
    assert (again.timings.images_cached, again.timings.vision_tiles, again.timings.vision_ms) == (1, 0, 0.0)
    assert again.token_ids == first.token_ids
    other_budget = pipeline.ask(Q, [images["tall"]], sampling=GREEDY, max_tiles=5).collect()
    assert other_budget.timings.images_cached == 0  # the tile settings are part of the key


def test_vision_cache_is_bounded_lru():
    cache = VisionCache(max_bytes=3 * 4000)
    plan = TilePlan((10, 10), (10, 10), (10, 10), 0, 0, 10)
    for key in "abcd":
        cache.put(key, EncodedImage(plan, np.zeros((1, 10, 100), np.float32)))
    assert len(cache) == 3 and cache.get("a") is None and cache.get("b").cached
    cache.put("e", EncodedImage(plan, np.zeros((1, 10, 100), np.float32)))
    assert cache.get("c") is None and cache.get("b") is not None  # b was used, so c went first
    cache.put("huge", EncodedImage(plan, np.zeros((1, 10, 1000), np.float32)))
    assert cache.get("huge") is None and len(cache) == 3


# -- chat ---------------------------------------------------------------------------------------------


def _reference_turn_two(setup, first_ids, generated, second_message, second_images, all_images):
    """The reference's whole conversation at the token level: turn-one prompt, the answer as generated,
    then the template's text after the answer (its end-of-turn piece and the new user turn)."""
    processor = setup.oracle.processor
    full = processor.apply_chat_template(
        [user(None, Q), {"role": "assistant", "content": [{"type": "text", "text": MARK}]}, second_message],
        add_generation_prompt=True)
    tail = full.split(MARK)[1]
    from PIL import Image

    pil = [Image.open(p).convert("RGB") for p in second_images]
    tail_ids = processor(text=tail, images=pil or None, return_tensors="pt")["input_ids"][0].tolist()
    eos = processor.tokenizer.eos_token_id
    assert tail_ids[0] == eos  # the template's end-of-turn piece starts with the end-of-turn token
    answer = generated[:-1] if generated[-1] == eos else generated
    ids = first_ids + answer + tail_ids
    inputs = setup.oracle.inputs([user(*[None] * len(all_images))], all_images)  # pixel values of every image
    import torch

    inputs["input_ids"] = torch.tensor([ids])
    inputs["attention_mask"] = torch.ones_like(inputs["input_ids"])
    return inputs, tail_ids


def test_second_turn_after_end_of_turn_feeds_only_new_rows(stopping, images):
    chat = stopping.pipeline.chat()
    first = chat.send(Q, [images["wide"]], sampling=GREEDY)
    answer1 = _check_parity(stopping, first, [user(None, Q)], [images["wide"]])
    assert answer1.finish_reason == "stop" and answer1.token_ids[-1] in stopping.pipeline.eos_token_ids
    assert 1 < len(answer1.token_ids) < MAX_NEW

    second_message = user("And what colours do you see?")
    second = chat.send("And what colours do you see?", sampling=GREEDY)
    answer2 = second.collect()
    inputs, tail_ids = _reference_turn_two(stopping, first.prompt.input_ids.tolist(), answer1.token_ids,
                                           second_message, [], [images["wide"]])
    assert second.prompt.input_ids.tolist() == tail_ids[1:]  # the cache already holds the end-of-turn token
    assert answer2.timings.history_tokens == len(first.prompt) + len(answer1.token_ids)
    assert answer2.token_ids == stopping.oracle.generate(inputs, MAX_NEW)


def test_second_turn_with_an_image_after_max_new_tokens(stopping, images):
    chat = stopping.pipeline.chat()
    first = chat.send(Q, [images["wide"]], sampling=SamplingParams(max_new_tokens=2))
    answer1 = first.collect()
    assert answer1.finish_reason == "length" and len(answer1.token_ids) == 2

    second = chat.send("Compare with this one.", [images["tall"]], sampling=GREEDY)
    answer2 = second.collect()
    inputs, tail_ids = _reference_turn_two(stopping, first.prompt.input_ids.tolist(), answer1.token_ids,
                                           user(None, "Compare with this one."), [images["tall"]],
                                           [images["wide"], images["tall"]])
    assert second.prompt.input_ids.tolist() == tail_ids  # the whole end-of-turn piece, then the new turn
    assert answer2.tiles_per_image == [13]
    assert answer2.token_ids == stopping.oracle.generate(inputs, MAX_NEW)


def test_turn_after_abort_refeeds_the_retemplated_conversation(stopping, images):
    pipeline = stopping.pipeline
    chat = pipeline.chat()
    steps = []
    for step in chat.send(Q, [images["wide"]], sampling=GREEDY):
        steps.append(step)
        pipeline.abort()
    assert steps[-1].finish_reason == "abort" and len([s for s in steps if s.token_id is not None]) == 1
    partial = "".join(s.text for s in steps)

    second = chat.send("Try again.", sampling=GREEDY)
    answer = second.collect()
    messages = [user(None, Q), {"role": "assistant", "content": [{"type": "text", "text": partial.removeprefix(" ")}]},
                user("Try again.")]
    inputs = stopping.oracle.inputs(messages, [images["wide"]])
    assert second.prompt.input_ids.tolist() == inputs["input_ids"][0].tolist()
    assert answer.timings.history_tokens == 0
    assert answer.token_ids == stopping.oracle.generate(inputs, MAX_NEW)


def test_interleaved_chats_rebuild_their_own_history(stopping, images):
    """Two conversations on one pipeline: the one that lost the decoder's cache re-feeds itself."""
    pipeline = stopping.pipeline
    chat_a, chat_b = pipeline.chat(), pipeline.chat()
    first = chat_a.send(Q, [images["wide"]], sampling=GREEDY).collect()
    chat_b.send("Hello there.", sampling=GREEDY).collect()
    second = chat_a.send("Try again.", sampling=GREEDY)
    answer = second.collect()
    assert answer.timings.history_tokens == 0
    text = first.text.removeprefix(" ")
    messages = [user(None, Q), {"role": "assistant", "content": [{"type": "text", "text": text}]}, user("Try again.")]
    inputs = stopping.oracle.inputs(messages, [images["wide"]])
    assert second.prompt.input_ids.tolist() == inputs["input_ids"][0].tolist()
    assert answer.token_ids == stopping.oracle.generate(inputs, MAX_NEW)


def test_a_stateless_call_takes_the_cache_from_a_chat(stopping):
    """The pipeline says whose history its decoder holds; a chat that lost it re-feeds itself, and a
    resumed turn for a conversation the cache does not hold is refused."""
    pipeline = stopping.pipeline
    chat = pipeline.chat()
    chat.send("Hello there.", sampling=GREEDY).collect()
    assert pipeline.holds_history(chat)
    pipeline.ask("Who are you?", sampling=GREEDY).collect()
    assert not pipeline.holds_history(chat)
    assert chat.send("Try again.", sampling=GREEDY).collect().timings.history_tokens == 0
    assert pipeline.holds_history(chat) and not pipeline.holds_history(None)
    prompt = pipeline.continuation_prompt("\n", [user("And then?")], [])
    with pytest.raises(DecoderError, match="no longer holds this conversation"):
        pipeline.reply(pipeline.begin_turn(), prompt, [], history=pipeline.chat(), resume=True)
    assert pipeline.holds_history(chat)  # the refused turn changed nothing


def test_continuation_text_matches_the_chat_template(base, images):
    """With a natural answer, [turn-one ids, answer ids, end token, our continuation] is exactly the
    reference processor's tokenization of the re-templated conversation."""
    pipeline, processor = base.pipeline, base.oracle.processor
    answer_text = "The image shows a cat on a red sofa."
    second = user("How many people are in the photo?")
    conversation = [user(None, Q), {"role": "assistant", "content": [{"type": "text", "text": answer_text}]}, second]
    expected = base.oracle.inputs(conversation, [images["wide"]])["input_ids"][0].tolist()
    first_ids = base.oracle.inputs([user(None, Q)], [images["wide"]])["input_ids"][0].tolist()
    answer_ids = pipeline.tokenizer.encode(" " + answer_text, add_special_tokens=False).ids
    eos = processor.tokenizer.eos_token_id
    eos_text = pipeline.tokenizer.id_to_token(eos)
    rest = pipeline.format.end_of_turn[len(eos_text):]
    continuation = pipeline.continuation_prompt(rest, [second], [])
    assert first_ids + answer_ids + [eos] + continuation.input_ids.tolist() == expected


def test_context_limits(base, images):
    small = Bundle.open(base.bundle)
    small.manifest["decoder"]["max_context"] = 1000
    with Pipeline(small, emulate=True) as pipeline:
        with pytest.raises(PromptError, match=r"the prompt is \d+ tokens but the model's context holds 999"):
            pipeline.ask(Q, [images["wide"], images["tall"]], sampling=GREEDY)
        chat = pipeline.chat()
        first = chat.send(Q, [images["wide"]], sampling=GREEDY).collect()
        with pytest.raises(ContextFull, match="no longer fits"):
            chat.send("And this one?", [images["tall"]], sampling=GREEDY)
        # nothing changed: the conversation goes on
        follow = chat.send("Thanks.", sampling=GREEDY).collect()
        assert follow.timings.history_tokens == 877 + len(first.token_ids)
        reply = chat.send("And this one?", [images["tall"]], sampling=GREEDY, on_overflow="reset")
        answer = reply.collect()
        assert answer.notices and "starting over" in answer.notices[0] and answer.timings.history_tokens == 0
        fresh = pipeline.ask("And this one?", [images["tall"]], sampling=GREEDY).collect()
        assert answer.token_ids == fresh.token_ids


# -- the emulation decoder on its own -------------------------------------------------------------


@pytest.fixture(scope="module")
def decoder(base):
    from board.decoder_torch import TorchDecoder

    with TorchDecoder(base.bundle / "host" / "decoder", tokenizer=base.pipeline.tokenizer,
                      eos_token_ids=sorted(base.pipeline.eos_token_ids), max_context=96) as decoder:
        yield decoder


def _rows(decoder, ids):
    return decoder.model.get_input_embeddings().weight[list(ids)].detach().numpy()


def test_keep_history_equals_one_fresh_run(decoder):
    """[A] then [B] on the kept cache == [A, answer to A, B] from scratch; the last answer token is in the history."""
    a, b = _rows(decoder, [1, 67, 105, 99, 100]), _rows(decoder, [215, 505, 42])
    params = SamplingParams(max_new_tokens=5)
    first = GenerationResult.collect(decoder.generate(a, sampling=params, keep_history=True))
    assert first.finish_reason == "length" and decoder.history_tokens == 5 + 5
    second = GenerationResult.collect(decoder.generate(b, sampling=params, keep_history=True))
    whole = np.concatenate([a, _rows(decoder, first.token_ids), b])
    fresh = GenerationResult.collect(decoder.generate(whole, sampling=params, keep_history=False))
    assert second.token_ids == fresh.token_ids
    assert second.stats.prefill_tokens == 1 + 3  # the pending answer token, then B


def test_decoder_checks_and_abort(decoder):
    hidden = decoder.hidden_size
    with pytest.raises(PromptError, match="does not fit the context"):
        decoder.generate(np.zeros((96, hidden), np.float32))
    with pytest.raises(PromptError, match="hidden size"):
        decoder.generate(np.zeros((3, hidden + 1), np.float32))
    with pytest.raises(PromptError, match="NaN"):
        decoder.generate(np.full((3, hidden), np.nan, np.float32))
    steps = decoder.generate(_rows(decoder, [1, 67]), sampling=SamplingParams(max_new_tokens=50))
    next(steps)
    with pytest.raises(DecoderError, match="already running"):
        decoder.generate(_rows(decoder, [1]))
    with pytest.raises(DecoderError, match="abort"):
        decoder.reset()
    decoder.abort()
    rest = list(steps)
    assert rest[-1].finish_reason == "abort" and len(rest) == 1


def test_sampling_is_seeded_and_top_k_1_is_greedy(decoder):
    rows = _rows(decoder, [1, 67, 105])

    def run(**kw):
        return GenerationResult.collect(decoder.generate(rows, sampling=SamplingParams(max_new_tokens=8, **kw))).token_ids

    greedy = run()
    assert run(top_k=1, temperature=0.8, seed=1) == greedy
    assert run(top_k=50, top_p=0.9, temperature=1.5, seed=3) == run(top_k=50, top_p=0.9, temperature=1.5, seed=3)
    penalized = run(repeat_penalty=50.0)
    assert len(set(penalized)) == len(penalized)  # no token repeats under a huge penalty


def test_incremental_detokenizer_never_emits_half_characters(base):
    from board.decoder_torch import IncrementalDetokenizer

    tokenizer = base.pipeline.tokenizer
    text = "Héllo wörld: 日本語 ✓ café, naïve"
    ids = tokenizer.encode(text, add_special_tokens=False).ids
    detok = IncrementalDetokenizer(tokenizer)
    pieces = [detok.add(i) for i in ids] + [detok.flush()]
    assert "".join(pieces) == text
    assert not any("\ufffd" in p for p in pieces)
    assert "" in pieces[:-1]  # a character split over tokens was held back until complete
