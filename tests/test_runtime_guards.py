"""The pipeline's guards for what rkllm.h does not promise: max_new_tokens capped to the context room, and the
KV cache checked before a chat turn continues it (the C double of librkllmrt that loses its cache); the
vision model choice (main or the opt-in conv fallback)."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

pytest.importorskip("torch")
pytest.importorskip("onnxruntime")
from support import compile_fake_rkllmrt, skip_without_rknn_toolkit  # noqa: E402

skip_without_rknn_toolkit()

from board import bundle_schema as S  # noqa: E402
from board import rkllm_h  # noqa: E402
from board.bundle import Bundle  # noqa: E402
from board.decoder import SamplingParams  # noqa: E402
from board.errors import BundleError  # noqa: E402
from board.pipeline import ContextFull, Pipeline  # noqa: E402
from board.vision import vision_model  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")


def _small(bundle, max_context: int) -> Bundle:
    small = Bundle.open(bundle)
    small.manifest[S.Manifest.DECODER][S.Decoder.MAX_CONTEXT] = max_context
    return small


def test_max_new_tokens_is_capped_to_the_room_left_in_the_context(bundle):
    with Pipeline(_small(bundle, 64), emulate=True) as pipeline:
        answer = pipeline.ask("Tell me a long story.", sampling=SamplingParams(max_new_tokens=500)).collect()
        used = answer.timings.prompt_tokens
        room = 64 - 1 - used  # upstream: max_context > prompt + max_new_tokens
        assert answer.finish_reason == "length" and len(answer.token_ids) == room
        assert answer.notices == [f"max_new_tokens 500 capped to {room}: the context holds 64 tokens and this turn "
                                  f"starts at {used}"]
        short = pipeline.ask("Tell me a long story.", sampling=SamplingParams(max_new_tokens=3)).collect()
        assert short.notices == [] and len(short.token_ids) == 3


def test_a_prompt_that_leaves_no_room_to_answer_is_refused(bundle):
    with Pipeline(_small(bundle, 64), emulate=True) as pipeline:
        chat = pipeline.chat()
        chat.send("Hello!", sampling=SamplingParams(max_new_tokens=20)).collect()
        with pytest.raises(ContextFull, match="no longer fits"):
            chat.send("And a second question that takes room.", sampling=SamplingParams(max_new_tokens=4))
        again = chat.send("And a second question that takes room.", sampling=SamplingParams(max_new_tokens=4),
                          on_overflow="reset").collect()
        assert "starting over" in again.notices[0] and again.timings.history_tokens == 0


@pytest.fixture
def double(tmp_path, monkeypatch):
    if shutil.which("gcc") is None:
        pytest.skip("gcc is needed to build the librkllmrt test double")
    lib = compile_fake_rkllmrt(tmp_path / "librkllmrt.so")
    monkeypatch.setenv(rkllm_h.LIB_ENV, str(lib))
    monkeypatch.setenv("FAKE_RKLLM_REPORT", str(tmp_path / "report.json"))
    model = tmp_path / "decoder.rkllm"
    model.write_bytes(b"the double only opens it")

    def make(bundle, scenario: str):
        from board.decoder_rkllm import RKLLMDecoder

        b = Bundle.open(bundle)
        monkeypatch.setenv("FAKE_RKLLM_SCENARIO", scenario)
        monkeypatch.setenv("FAKE_RKLLM_EOS", str(b.eos_token_ids[0]))  # its stream ends with the end-of-turn id
        return RKLLMDecoder(model, hidden_size=b.hidden_size, max_context=b.max_context, eos_token_ids=b.eos_token_ids)

    return make


@pytest.mark.parametrize("scenario", ["stream", "loses_cache"])
def test_a_chat_continues_the_cache_only_while_it_holds_the_history(bundle, double, scenario):
    with Pipeline(bundle, emulate=True, decoder=double(bundle, scenario)) as pipeline:
        chat = pipeline.chat()
        first = chat.send("Hi", sampling=SamplingParams(max_new_tokens=8)).collect()
        second = chat.send("And?", sampling=SamplingParams(max_new_tokens=8)).collect()
        third = chat.send("More.", sampling=SamplingParams(max_new_tokens=8)).collect()
    report = json.loads(Path(os.environ["FAKE_RKLLM_REPORT"]).read_text())
    kept = [r["keep_history"] for r in report["runs"]]
    assert first.token_ids[-1] == Bundle.open(bundle).eos_token_ids[0] and kept == [1, 1, 1]
    if scenario == "stream":  # the cache holds the conversation: each turn feeds only itself
        assert second.timings.history_tokens > 0 and third.timings.history_tokens > second.timings.history_tokens
        assert second.notices == third.notices == []
        assert [r["kv_before"] for r in report["runs"]][1:] == [second.timings.history_tokens,
                                                                third.timings.history_tokens]
    else:  # the runtime dropped it: cleared, the whole conversation re-fed, said once
        assert second.timings.history_tokens == third.timings.history_tokens == 0
        assert "holds 0 tokens where the conversation expects" in second.notices[0] and third.notices == []
        assert report["runs"][2]["n_tokens"] > report["runs"][0]["n_tokens"]  # turn 3 re-fed turns 1 and 2 too


def test_the_pipeline_gives_the_runtime_the_bundles_embed_flash_unless_told_otherwise(bundle, double, tmp_path):
    """Pipeline(embed_flash=None) takes the manifest's default (host.convert --embed-flash); True/False
    (run.py's and serve.py's --embed-flash / --no-embed-flash) override it. The Pipeline opens the
    decoder itself here (no emulation), on the C double."""
    from board.vision import VisionEncoder

    double(bundle, "stream")  # builds the double and points the environment at it
    copy = tmp_path / "bundle"
    shutil.copytree(bundle, copy)
    (copy / S.DECODER_RKLLM).write_bytes(b"the double only opens it")
    b = Bundle.open(copy, verify=False)
    b.manifest[S.Manifest.DECODER][S.Decoder.FILE] = S.DECODER_RKLLM
    b.manifest[S.Manifest.FILES][S.DECODER_RKLLM] = "unchecked"
    vision = VisionEncoder(tile=b.split_settings.tile, tokens_per_tile=b.prompt_format.image_seq_len,
                           hidden_size=b.hidden_size, feed=None)  # never asked to encode here
    seen = []
    for recorded in (False, True):
        b.manifest[S.Manifest.DECODER][S.Decoder.EMBED_FLASH] = recorded
        for override in (None, True, False):
            with Pipeline(b, check_system=False, verify=False, vision=vision, embed_flash=override):
                init = json.loads(Path(os.environ["FAKE_RKLLM_REPORT"]).read_text())["init"]
                seen.append((recorded, override, init["embed_flash"]))
    assert seen == [(False, None, 0), (False, True, 1), (False, False, 0),
                    (True, None, 1), (True, True, 1), (True, False, 0)]


def test_the_vision_model_choice():
    V, F, A = S.Vision, S.VisionFallback, S.VisionAccuracy
    section = {V.FILE: "vision.rknn", V.ONNX: "host/vision.onnx", V.DTYPE: "int8", V.LAYOUT: "patches16",
               V.ACCURACY: {A.THRESHOLD: 0.99}}
    main = vision_model(section)
    assert (main.file, main.layout, main.dtype, main.min_cosine, main.fallback) == (
        "vision.rknn", "patches16", "int8", 0.99, False)
    with pytest.raises(BundleError, match="no fallback vision model") as err:
        vision_model(section, fallback=True)
    assert "--vision-fallback" in err.value.hint
    section[V.FALLBACK] = {F.FILE: S.VISION_FALLBACK_RKNN, F.ONNX: S.VISION_FALLBACK_ONNX, F.DTYPE: "fp16", F.LAYOUT: "conv"}
    spare = vision_model(section, fallback=True)
    assert (spare.file, spare.onnx, spare.layout, spare.dtype, spare.fallback) == (
        "vision_conv.rknn", "host/vision_conv.onnx", "conv", "fp16", True)


def test_a_bundle_without_the_fallback_says_how_to_get_it(bundle):
    with pytest.raises(BundleError, match="no fallback vision model"):
        Pipeline(bundle, emulate=True, vision_fallback=True)


class _RKNNLite:
    """A stand-in `rknnlite.api.RKNNLite` whose get_sdk_version reports a chosen librknnrt."""

    NPU_CORE_0, NPU_CORE_1, NPU_CORE_2, NPU_CORE_0_1_2 = 1, 2, 4, 7
    sdk = ""
    released = 0

    def __init__(self, verbose=False):
        pass

    def load_rknn(self, path):
        return 0

    def init_runtime(self, core_mask=0):
        return 0

    def get_sdk_version(self):
        return self.sdk

    def release(self):
        _RKNNLite.released += 1


@pytest.fixture
def rknnlite(monkeypatch):
    import sys
    import types

    package, api = types.ModuleType("rknnlite"), types.ModuleType("rknnlite.api")
    api.RKNNLite, package.api = _RKNNLite, api
    monkeypatch.setitem(sys.modules, "rknnlite", package)
    monkeypatch.setitem(sys.modules, "rknnlite.api", api)
    _RKNNLite.released = 0
    return _RKNNLite


def test_a_librknnrt_older_than_the_models_toolkit_is_refused(rknnlite):
    from board.errors import RuntimeUnavailable
    from board.vision import RKNNVisionEncoder

    rknnlite.sdk = "RKNN VERSION:\n  API: 2.5.0 (1a2b)\n  DRV: rknn_server: 2.5.0 (3c4d), rknnrt: 2.3.2 (5e6f)"
    with pytest.raises(RuntimeUnavailable, match=r"librknnrt 2\.3\.2 is older than rknn-toolkit2 2\.5\.0") as err:
        RKNNVisionEncoder("vision.rknn", tile=32, tokens_per_tile=4, hidden_size=8, built_with="2.5.0")
    assert "librknnrt.so 2.5.0 or newer" in err.value.hint and rknnlite.released == 1  # nothing left open
    rknnlite.sdk = rknnlite.sdk.replace("2.3.2", "2.5.1")
    with RKNNVisionEncoder("vision.rknn", tile=32, tokens_per_tile=4, hidden_size=8, cores="parallel",
                           built_with="2.5.0") as encoder:
        assert "rknnrt: 2.5.1" in encoder.sdk_version and encoder.notices == []
    rknnlite.sdk = "no version here"
    with RKNNVisionEncoder("vision.rknn", tile=32, tokens_per_tile=4, hidden_size=8, built_with="2.5.0") as encoder:
        assert "cannot compare librknnrt" in encoder.notices[0]  # said, not refused
