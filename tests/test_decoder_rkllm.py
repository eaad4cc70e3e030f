"""RKLLMDecoder and the library loader against the C test double of librkllmrt (tests/c/fake_rkllmrt.c).

The double is compiled here with gcc from the project's own declarations; it reports what it
received (JSON at $FAKE_RKLLM_REPORT) and behaves per $FAKE_RKLLM_SCENARIO, read at rkllm_init.
"""

from __future__ import annotations

import ctypes
import gc
import json
import os
import platform
import shutil
import signal
import subprocess
import threading
import time
import zlib
from pathlib import Path

import numpy as np
import pytest

from board import rkllm_h
from board.decoder import GenerationResult, SamplingParams
from board.decoder_rkllm import RKLLMDecoder, _Utf8Joiner
from board.errors import BundleError, DecoderError, PrefillMismatch, PromptError, RuntimeUnavailable
from support import compile_fake_rkllmrt

C_DIR = Path(__file__).parent / "c"
HIDDEN = 16

pytestmark = pytest.mark.skipif(shutil.which("gcc") is None, reason="gcc is needed to build the librkllmrt test double")


_compile = compile_fake_rkllmrt


@pytest.fixture(scope="session")
def libs(tmp_path_factory):
    d = tmp_path_factory.mktemp("fake_rkllmrt")
    return {
        "fake": _compile(d / "librkllmrt.so"),
        "abi_1_2": _compile(d / "librkllmrt_abi12.so", "-DFAKE_ABI_1_2"),
        "before_1_2_1": _compile(d / "librkllmrt_old.so", "-DFAKE_BEFORE_1_2_1"),
    }


class Fake:
    """One test's view of the double: its scenario, its report, a model file to point at."""

    def __init__(self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
        self.report_path = tmp_path / "report.json"
        self.model = tmp_path / "decoder.rkllm"
        self.model.write_bytes(b"not a real model; the double only opens it")
        self._mp = monkeypatch
        monkeypatch.setenv("FAKE_RKLLM_REPORT", str(self.report_path))
        monkeypatch.setenv("FAKE_RKLLM_HIDDEN", str(HIDDEN))
        self.scenario("stream")

    def scenario(self, name: str) -> None:
        self._mp.setenv("FAKE_RKLLM_SCENARIO", name)

    def report(self) -> dict:
        return json.loads(self.report_path.read_text())

    def decoder(self, **kw) -> RKLLMDecoder:
        kw.setdefault("hidden_size", HIDDEN)
        kw.setdefault("max_context", 256)
        return RKLLMDecoder(self.model, **kw)


@pytest.fixture
def fake(libs, tmp_path, monkeypatch):
    monkeypatch.setenv(rkllm_h.LIB_ENV, str(libs["fake"]))
    return Fake(tmp_path, monkeypatch)


def _emb(n: int = 5, width: int = HIDDEN, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, width)).astype(np.float32)


# --- streaming, parameters, perf ----------------------------------------------------------------


def test_streams_tokens_with_perf_and_feeds_the_exact_embeddings(fake):
    emb = _emb(7)
    with fake.decoder() as dec:
        steps = list(dec.generate(emb))
    assert [s.text for s in steps] == ["Hello", " world", "!", ""]
    assert [s.token_id for s in steps] == [100, 101, 102, None]
    assert [s.finish_reason for s in steps] == [None, None, None, "stop"]
    stats = steps[-1].stats
    assert (stats.prefill_tokens, stats.prefill_ms, stats.generate_tokens, stats.generate_ms, stats.memory_mb) == (
        7, 12.5, 3, 12.0, 321.5)
    assert stats.decode_tok_s == pytest.approx(250.0)
    (run,) = fake.report()["runs"]
    assert run["input_type"] == int(rkllm_h.RKLLMInputType.RKLLM_INPUT_EMBED)
    assert run["n_tokens"] == 7
    assert run["crc32"] == zlib.crc32(emb.tobytes())  # every float arrived, in order
    assert (run["role"], run["enable_thinking"], run["mode"], run["keep_history"]) == ("user", 0, 0, 0)
    assert run["userdata_null"] == 1 and run["has_lora"] == 0 and run["has_prompt_cache"] == 0
    assert fake.report()["callback_returns"] == [0, 0, 0, 0]  # continue, every time


def test_any_array_arrives_as_contiguous_float32_rows(fake):
    base = np.random.default_rng(1).standard_normal((HIDDEN, 4))  # float64, and transposed below
    with fake.decoder() as dec:
        GenerationResult.collect(dec.generate(base.T))
    assert fake.report()["runs"][0]["crc32"] == zlib.crc32(np.ascontiguousarray(base.T, dtype=np.float32).tobytes())


def test_init_parameters_reach_the_runtime(fake):
    sampling = SamplingParams(max_new_tokens=77, top_k=20, top_p=0.8, temperature=0.7, repeat_penalty=1.05)
    with fake.decoder(max_context=320, sampling=sampling, enabled_cpus=(1, 0), base_domain_id=0,
                      skip_special_token=False):
        init = fake.report()["init"]
    assert init["model_path"] == str(fake.model)
    assert (init["max_context_len"], init["max_new_tokens"], init["top_k"]) == (320, 77, 20)
    assert (init["top_p"], init["temperature"], init["repeat_penalty"]) == pytest.approx((0.8, 0.7, 1.05))
    assert (init["enabled_cpus_num"], init["enabled_cpus_mask"], init["base_domain_id"]) == (2, 0b11, 0)
    assert (init["skip_special_token"], init["ignore_eos_token"], init["is_async"], init["n_batch"]) == (0, 0, 0, 1)
    # untouched fields keep the runtime's defaults (rkllm_createDefaultParam, then override)
    assert (init["n_keep"], init["mirostat_tau"], init["mirostat_eta"], init["reserved_zero"]) == pytest.approx(
        (-1, 5.0, 0.1, 1))
    assert init["has_tokenizer_callback"] == 0 and init["has_embed_callback"] == 0


def test_default_settings_use_the_big_cores_and_domain_1(fake):
    with fake.decoder():
        init = fake.report()["init"]
    assert (init["enabled_cpus_num"], init["enabled_cpus_mask"], init["base_domain_id"]) == (4, 0xF0, 1)
    assert (init["skip_special_token"], init["top_k"]) == (1, 1)  # greedy by default


def test_per_call_sampling_and_max_new_tokens(fake):
    with fake.decoder() as dec:
        greedy = GenerationResult.collect(dec.generate(_emb(), sampling=SamplingParams(top_k=50, temperature=0.0)))
        short = GenerationResult.collect(
            dec.generate(_emb(), sampling=SamplingParams(max_new_tokens=2, top_k=30, top_p=0.5, temperature=0.9)))
    first, second = fake.report()["runs"]
    assert (first["sampling"]["top_k"], first["sampling"]["temperature"]) == (1, 1.0)  # temperature 0 means greedy
    assert first["max_new_tokens"] == 512 and greedy.finish_reason == "stop"
    assert (second["sampling"]["top_k"], second["max_new_tokens"]) == (30, 2)
    assert (second["sampling"]["top_p"], second["sampling"]["temperature"]) == pytest.approx((0.5, 0.9))
    assert second["sampling"]["mirostat_tau"] == pytest.approx(5.0)  # the rest comes from the init defaults
    assert (short.text, short.finish_reason) == ("Hello world", "length")


def test_a_call_without_sampling_uses_the_decoders_default(fake):
    """The Decoder protocol and both implementations mean the same by sampling=None: the decoder's own."""
    import inspect

    from board.decoder import Decoder
    from board.decoder_torch import TorchDecoder

    defaults = {cls.__name__: inspect.signature(cls.generate).parameters["sampling"].default
                for cls in (Decoder, RKLLMDecoder, TorchDecoder)}
    assert defaults == {"Decoder": None, "RKLLMDecoder": None, "TorchDecoder": None}
    with fake.decoder(sampling=SamplingParams(max_new_tokens=3, top_k=7, temperature=0.5)) as dec:
        GenerationResult.collect(dec.generate(_emb()))
    (run,) = fake.report()["runs"]
    assert (run["sampling"]["top_k"], run["max_new_tokens"]) == (7, 3)
    assert run["sampling"]["temperature"] == pytest.approx(0.5)


def test_seed_cannot_be_honoured_when_sampling(fake):
    with fake.decoder() as dec:
        with pytest.warns(UserWarning, match="no sampling seed"):
            dec.generate(_emb(), sampling=SamplingParams(top_k=40, temperature=0.8, seed=3))


# --- UTF-8 ----------------------------------------------------------------------------------------


def test_multibyte_characters_split_across_callbacks(fake):
    fake.scenario("utf8")
    with fake.decoder() as dec:
        steps = list(dec.generate(_emb()))
    assert [s.text for s in steps] == ["caf", "", "é", " ", "中", ""]
    assert [s.token_id for s in steps[:-1]] == [200, 201, 202, 203, 204]
    assert "".join(s.text for s in steps) == "café 中"


def test_whole_character_resent_after_waiting(fake):
    fake.scenario("utf8_resend")
    with fake.decoder() as dec:
        assert GenerationResult.collect(dec.generate(_emb())).text == "café"


@pytest.mark.parametrize(
    "pieces, texts, tail",
    [
        ([b"ab", b"c"], ["ab", "c"], ""),
        ([b"\xf0", b"\x9f", b"\x98\x80", b"!"], ["", "", "\U0001F600", "!"], ""),  # 4 bytes over 3 calls
        ([b"x\xe4\xb8", b"\xady"], ["x", "\u4e2dy"], ""),
        ([b"end\xe4\xb8"], ["end"], "\ufffd"),  # the run stopped mid-character
        ([b"\xe4", b"\xe4\xb8\xad"], ["", "\u4e2d"], ""),  # orphaned lead byte, then the whole character
    ],
)
def test_utf8_joiner(pieces, texts, tail):
    joiner = _Utf8Joiner()
    assert [joiner.feed(p) for p in pieces] == texts
    assert joiner.flush() == tail


# --- errors ---------------------------------------------------------------------------------------


def test_error_state_becomes_decoder_error(fake):
    fake.scenario("error_state")
    with fake.decoder() as dec:
        seen = []
        with pytest.raises(DecoderError, match=r"rkllm_run.*RKLLM_RUN_ERROR"):
            for step in dec.generate(_emb()):
                seen.append(step.text)
        assert seen == ["Hello"]
    assert fake.report()["destroys"] == 1


def test_nonzero_return_code_becomes_decoder_error(fake):
    fake.scenario("run_fail")
    with fake.decoder() as dec:
        with pytest.raises(DecoderError, match=r"rkllm_run failed \(code -1\)"):
            list(dec.generate(_emb()))


def test_failed_init_raises_and_destroys_nothing(fake):
    fake.scenario("init_fail")
    with pytest.raises(DecoderError, match=r"rkllm_init failed with code -1") as err:
        fake.decoder()
    assert "1.3.0" in err.value.hint
    fake.scenario("init_null")
    with pytest.raises(DecoderError, match="no handle"):
        fake.decoder()
    report = fake.report()
    assert (report["inits"], report["destroys"], report["bad_handle_calls"]) == (2, 0, 0)


def test_missing_model_file_is_a_bundle_error(fake):
    with pytest.raises(BundleError, match="decoder model not found"):
        RKLLMDecoder(fake.model.with_name("missing.rkllm"), hidden_size=HIDDEN, max_context=64)
    assert not fake.report_path.exists()  # refused before rkllm_init


@pytest.mark.parametrize(
    "emb, match",
    [
        (_emb(5, HIDDEN + 1), r"\[n_tokens, 16\]"),
        (_emb(5, HIDDEN)[0], r"\[n_tokens, 16\]"),
        (np.zeros((0, HIDDEN), np.float32), "empty"),
        (np.full((3, HIDDEN), np.nan, np.float32), "NaN"),
    ],
)
def test_bad_embeddings_refused_before_c(fake, emb, match):
    with fake.decoder() as dec:
        with pytest.raises(PromptError, match=match):
            dec.generate(emb)
    assert fake.report()["runs"] == []


def test_sequence_longer_than_the_context_refused(fake):
    with fake.decoder(max_context=16) as dec:
        with pytest.raises(PromptError, match="does not fit the context"):
            dec.generate(_emb(16))
        GenerationResult.collect(dec.generate(_emb(5), keep_history=True))  # 5 fed + 3 generated stay cached
        with pytest.raises(PromptError, match="8 cached"):
            dec.generate(_emb(8), keep_history=True)
        GenerationResult.collect(dec.generate(_emb(8)))  # a fresh turn fits
    assert len(fake.report()["runs"]) == 2


# --- conversation state ---------------------------------------------------------------------------


def test_keep_history_and_reset(fake):
    with fake.decoder() as dec:
        GenerationResult.collect(dec.generate(_emb(5), keep_history=True))
        GenerationResult.collect(dec.generate(_emb(2), keep_history=True))
        dec.reset()
        assert fake.report()["clears"] == 1
        GenerationResult.collect(dec.generate(_emb(4), keep_history=True))
        GenerationResult.collect(dec.generate(_emb(3)))  # a fresh turn after kept history clears first
    report = fake.report()
    assert [(r["keep_history"], r["kv_before"]) for r in report["runs"]] == [(1, 0), (1, 8), (1, 0), (0, 0)]
    assert report["clears"] == 2 and report["errors"] == []


# --- what rkllm.h does not promise: the guards ------------------------------------------------------


def test_an_empty_chat_template_is_set_after_init(fake):
    with fake.decoder() as dec:
        assert dec.notices == []
    assert fake.report()["templates"] == [{"system_prompt": "", "prompt_prefix": "", "prompt_postfix": ""}]


def test_a_runtime_that_wraps_embed_input_in_its_template_is_stopped_by_the_empty_template(fake):
    """adds_template: the double puts 6 template tokens around EMBED input unless the template is emptied."""
    fake.scenario("adds_template")
    with fake.decoder() as dec:
        result = GenerationResult.collect(dec.generate(_emb(7)))
    assert result.stats.prefill_tokens == 7 and result.finish_reason == "stop"


def test_a_template_the_runtime_keeps_is_a_warning_then_a_prefill_mismatch(fake):
    fake.scenario("template_fail")
    with pytest.warns(UserWarning, match=r"empty template failed with code -1"):
        dec = fake.decoder()
    with dec:
        assert "code -1" in dec.notices[0]
        with pytest.raises(PrefillMismatch, match=r"prefilled 13 tokens but 7 embedding rows were fed"):
            GenerationResult.collect(dec.generate(_emb(7)))
        assert dec._history_kept  # the cache is unknown: the next fresh turn clears it
        with pytest.raises(PrefillMismatch):
            GenerationResult.collect(dec.generate(_emb(3)))
    assert fake.report()["clears"] == 1


def test_a_miscounted_prefill_is_an_error_naming_both_numbers(fake):
    fake.scenario("miscount")
    with fake.decoder() as dec:
        steps = []
        with pytest.raises(PrefillMismatch, match=r"prefilled 6 tokens but 5 embedding rows were fed") as err:
            for step in dec.generate(_emb(5)):
                steps.append(step)
    assert [s.text for s in steps] == ["Hello", " world", "!"]  # the answer streamed; the error comes at the end
    assert "doctor" in err.value.hint


def test_history_tokens_is_the_runtimes_kv_cache_size(fake):
    with fake.decoder() as dec:
        assert dec.history_tokens == 0
        GenerationResult.collect(dec.generate(_emb(5), keep_history=True))
        assert dec.history_tokens == 5 + 3
        GenerationResult.collect(dec.generate(_emb(2), keep_history=True))
        assert dec.history_tokens == 8 + 2 + 3
        dec.reset()
        assert dec.history_tokens == 0


def test_a_runtime_that_loses_the_cache_shows_in_history_tokens(fake):
    fake.scenario("loses_cache")
    with fake.decoder() as dec:
        GenerationResult.collect(dec.generate(_emb(5), keep_history=True))
        assert dec.history_tokens == 0  # a conversation expecting 8 sees the loss before its next turn


def test_the_eos_guard_stops_a_runtime_that_streams_past_the_end_of_turn(fake, monkeypatch):
    """eos: the double streams id 2 second, then goes on (20 ms a token); the guard aborts it there."""
    fake.scenario("eos")
    with fake.decoder(eos_token_ids=[2, 49279], sampling=SamplingParams(max_new_tokens=200)) as dec:
        start = time.monotonic()
        result = GenerationResult.collect(dec.generate(_emb(5)))
        elapsed = time.monotonic() - start
        assert (result.token_ids, result.finish_reason) == ([1000, 2], "stop")
        assert elapsed < 2.0 and fake.report()["aborts"] == 1
        assert len(fake.report()["callback_returns"]) < 10
        again = GenerationResult.collect(dec.generate(_emb(5), sampling=SamplingParams(max_new_tokens=1)))
        assert (again.token_ids, again.finish_reason) == ([1000], "length")  # the guard's abort does not linger
    with fake.decoder(sampling=SamplingParams(max_new_tokens=6)) as dec:  # without EOS ids the runtime decides
        assert len(GenerationResult.collect(dec.generate(_emb(5))).token_ids) == 6


def test_embed_flash_and_log_level_reach_the_runtime(fake, monkeypatch):
    monkeypatch.delenv("RKLLM_LOG_LEVEL", raising=False)
    with fake.decoder():
        init = fake.report()["init"]
    assert (init["embed_flash"], init["log_level"]) == (0, None)  # the runtime's defaults, the environment as it was
    with fake.decoder(embed_flash=True, log_level=1):
        init = fake.report()["init"]
    assert (init["embed_flash"], init["log_level"]) == (1, "1")


def test_the_last_runs_embeddings_stay_alive_until_the_next_run_or_a_clear(fake):
    with fake.decoder() as dec:
        emb = _emb(5)
        GenerationResult.collect(dec.generate(emb, keep_history=True))
        run = dec._last_run  # what the runtime was handed points into the array still held
        assert ctypes.addressof(run.input.embed_input.embed.contents) == run.embeddings.ctypes.data
        assert np.array_equal(run.embeddings, emb)
        dec.reset()
        assert dec._last_run is None


# --- abort ----------------------------------------------------------------------------------------


def test_abort_from_another_thread(fake):
    fake.scenario("slow")  # 20 ms per token, up to max_new_tokens
    with fake.decoder(sampling=SamplingParams(max_new_tokens=200)) as dec:
        steps, start = [], time.monotonic()
        for step in dec.generate(_emb()):
            steps.append(step)
            if len(steps) == 3:
                threading.Thread(target=dec.abort).start()
        elapsed = time.monotonic() - start
        assert steps[-1].finish_reason == "abort"
        assert len(steps) < 10 and elapsed < 2.0
        assert fake.report()["aborts"] >= 1
        again = GenerationResult.collect(dec.generate(_emb(), sampling=SamplingParams(max_new_tokens=2)))
        assert (again.text, again.finish_reason) == ("tok0 tok1 ", "length")  # the abort does not linger


def test_abort_lost_before_the_run_started_is_repeated(fake, monkeypatch):
    """rkllm_abort reaching the runtime just before its run begins is forgotten by it; the decoder
    asks again when the next token arrives."""
    fake.scenario("slow")
    with fake.decoder(sampling=SamplingParams(max_new_tokens=200)) as dec:
        real_run = dec._lib.rkllm_run

        def run_after_early_abort(*args):
            dec.abort()  # the double clears its abort flag when the run starts
            return real_run(*args)

        monkeypatch.setattr(dec._lib, "rkllm_run", run_after_early_abort)
        result = GenerationResult.collect(dec.generate(_emb()))
    report = fake.report()
    assert result.finish_reason == "abort"
    assert report["aborts"] >= 2 and len(report["callback_returns"]) < 10


def test_keyboard_interrupt_at_a_yield_aborts_and_waits(fake):
    fake.scenario("slow")
    with fake.decoder(sampling=SamplingParams(max_new_tokens=200)) as dec:
        gen = dec.generate(_emb())
        next(gen), next(gen)
        with pytest.raises(KeyboardInterrupt):
            gen.throw(KeyboardInterrupt)
        assert dec._worker is None or not dec._worker.is_alive()  # the run has returned
        assert fake.report()["aborts"] == 1
        assert len(fake.report()["callback_returns"]) < 10
        assert GenerationResult.collect(dec.generate(_emb(), sampling=SamplingParams(max_new_tokens=1))).text == "tok0 "


def test_real_sigint_while_waiting_for_tokens(fake):
    fake.scenario("slow")
    # 1000 slow tokens take 20 s unless the interrupt stops them; the bound leaves room for a loaded machine
    with fake.decoder(sampling=SamplingParams(max_new_tokens=1000)) as dec:
        gen = dec.generate(_emb())
        next(gen)
        timer = threading.Timer(0.15, os.kill, (os.getpid(), signal.SIGINT))
        timer.start()
        start = time.monotonic()
        with pytest.raises(KeyboardInterrupt):
            for _ in gen:
                pass
        gen.close()  # if Ctrl-C landed between two steps, closing the generator stops the run
        timer.join()
        assert time.monotonic() - start < 8.0
        assert fake.report()["aborts"] == 1
        assert dec._worker is None or not dec._worker.is_alive()


def test_generator_closed_early_stops_the_run(fake):
    fake.scenario("slow")
    with fake.decoder(sampling=SamplingParams(max_new_tokens=200)) as dec:
        for step in dec.generate(_emb()):
            break
        assert fake.report()["aborts"] == 1
        assert len(fake.report()["callback_returns"]) < 10


# --- handle lifetime --------------------------------------------------------------------------------


def _consume_then_error(dec):
    for _ in dec.generate(_emb()):
        raise RuntimeError("consumer failed")


@pytest.mark.parametrize("path", ["close_twice", "context_manager", "consumer_error", "run_error", "garbage_collected"])
def test_destroyed_exactly_once(fake, path):
    if path == "run_error":
        fake.scenario("error_state")
    dec = fake.decoder()
    if path == "close_twice":
        dec.close()
        dec.close()
    elif path == "context_manager":
        with dec:
            GenerationResult.collect(dec.generate(_emb()))
    elif path in ("consumer_error", "run_error"):
        with pytest.raises((RuntimeError, DecoderError)):
            with dec:
                _consume_then_error(dec) if path == "consumer_error" else list(dec.generate(_emb()))
        dec.close()
    else:
        del dec
        gc.collect()
    report = fake.report()
    assert (report["inits"], report["destroys"], report["live_handles"], report["bad_handle_calls"]) == (1, 1, 0, 0)


def test_close_during_a_run_from_another_thread(fake):
    fake.scenario("slow")
    dec = fake.decoder(sampling=SamplingParams(max_new_tokens=200))
    steps = []
    for step in dec.generate(_emb()):
        steps.append(step)
        if len(steps) == 2:
            closer = threading.Thread(target=dec.close)
            closer.start()
    closer.join()
    assert steps[-1].finish_reason == "abort"
    report = fake.report()
    assert (report["destroys"], report["bad_handle_calls"]) == (1, 0)  # no call on the handle after destroy
    with pytest.raises(DecoderError, match="closed"):
        dec.generate(_emb())


def test_failed_destroy_is_reported_once(fake):
    fake.scenario("destroy_fail")
    dec = fake.decoder()
    with pytest.raises(DecoderError, match=r"rkllm_destroy failed with code -1"):
        dec.close()
    dec.close()
    assert fake.report()["destroys"] == 1


# --- finding the library ----------------------------------------------------------------------------


@pytest.fixture
def no_env(monkeypatch, tmp_path):
    monkeypatch.delenv(rkllm_h.LIB_ENV, raising=False)
    monkeypatch.setattr(rkllm_h, "SYSTEM_LIB_DIRS", (str(tmp_path / "usr_lib"),))
    return tmp_path


def test_not_found_says_where_it_looked_and_where_to_get_it(no_env, tmp_path):
    bundle = tmp_path / "bundle"
    with pytest.raises(RuntimeUnavailable, match="was not found") as err:
        rkllm_h.load_library([bundle])
    assert str(bundle / "librkllmrt.so") in err.value.message
    assert str(tmp_path / "usr_lib" / "librkllmrt.so") in err.value.message
    assert "airockchip/rknn-llm" in err.value.hint and "aarch64/librkllmrt.so" in err.value.hint
    assert "/usr/lib/" in err.value.hint
    model = tmp_path / "decoder.rkllm"
    model.write_bytes(b"x")
    with pytest.raises(RuntimeUnavailable, match="was not found"):
        RKLLMDecoder(model, hidden_size=HIDDEN, max_context=64, library_dirs=[bundle])


def test_env_var_pointing_nowhere(monkeypatch, tmp_path):
    monkeypatch.setenv(rkllm_h.LIB_ENV, str(tmp_path / "nope.so"))
    with pytest.raises(RuntimeUnavailable, match=r"not found; looked at: RKLLM_LIB="):
        rkllm_h.load_library()


def test_found_in_the_bundle_folder(no_env, libs, tmp_path):
    bundle = tmp_path / "bundle"
    bundle.mkdir()
    shutil.copy(libs["fake"], bundle / "librkllmrt.so")
    lib = rkllm_h.load_library([bundle])
    assert lib.path == bundle / "librkllmrt.so"
    assert rkllm_h.load_library([bundle]) is lib  # loaded once


def test_wrong_architecture_is_a_load_failure(no_env, libs, tmp_path, monkeypatch):
    # the double relabelled for another CPU: aarch64 on x86 (a board library copied to the host), x86_64 on aarch64
    foreign, machine = (62, "x86_64") if platform.machine() == "aarch64" else (183, "aarch64")
    other = bytearray(libs["fake"].read_bytes())
    other[18:20] = foreign.to_bytes(2, "little")  # e_machine
    (tmp_path / "other.so").write_bytes(bytes(other))
    monkeypatch.setenv(rkllm_h.LIB_ENV, str(tmp_path / "other.so"))
    with pytest.raises(RuntimeUnavailable, match="could not load it") as err:
        rkllm_h.load_library()
    assert f"built for {machine} and this machine is {platform.machine()}" in err.value.message
    assert "aarch64/librkllmrt.so" in err.value.hint
    (tmp_path / "text.so").write_text("not a library")
    monkeypatch.setenv(rkllm_h.LIB_ENV, str(tmp_path / "text.so"))
    with pytest.raises(RuntimeUnavailable, match="not an ELF file"):
        rkllm_h.load_library()


def test_older_runtime_missing_functions(monkeypatch, libs):
    monkeypatch.setenv(rkllm_h.LIB_ENV, str(libs["before_1_2_1"]))
    with pytest.raises(RuntimeUnavailable, match=r"older than 1\.2\.1, and 1\.3\.0 is required") as err:
        rkllm_h.load_library()
    assert "rkllm_get_kv_cache_size" in err.value.message


def test_not_librkllmrt_at_all(monkeypatch, libs, tmp_path):
    other = tmp_path / "libother.so"
    src = tmp_path / "other.c"
    src.write_text("int something_else(void) { return 1; }\n")
    subprocess.run(["gcc", "-shared", "-fPIC", str(src), "-o", str(other)], check=True)
    monkeypatch.setenv(rkllm_h.LIB_ENV, str(other))
    with pytest.raises(RuntimeUnavailable, match="is not librkllmrt"):
        rkllm_h.load_library()


def test_1_2_layout_refused_unless_overridden(monkeypatch, libs):
    monkeypatch.setenv(rkllm_h.LIB_ENV, str(libs["abi_1_2"]))
    with pytest.raises(RuntimeUnavailable, match=r"1\.2\.1-1\.2\.3 layout") as err:
        rkllm_h.load_library()
    assert rkllm_h.SKIP_LAYOUT_CHECK_ENV in err.value.hint
    monkeypatch.setenv(rkllm_h.SKIP_LAYOUT_CHECK_ENV, "1")
    assert rkllm_h.load_library().path == libs["abi_1_2"]


def test_module_level_functions_call_the_loaded_library(fake, monkeypatch):
    lib = rkllm_h.load_library()
    monkeypatch.setattr(rkllm_h, "_DEFAULT", lib)
    param = rkllm_h.rkllm_createDefaultParam()
    assert isinstance(param, rkllm_h.RKLLMParam)
    assert (param.top_k, param.extend_param.n_batch, param.max_context_len) == (40, 1, 512)
    assert rkllm_h.rkllm_destroy(None) == -1  # a NULL handle reaches the double, which refuses it
