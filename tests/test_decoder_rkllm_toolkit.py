"""The rkllm-toolkit step. The real toolkit runs only where its venv is made with Rockchip's wheel
(scripts/setup_rkllm_toolkit.sh; these tests say so when they skip); what does not need it (context
validation, the install message, the metrics, how held-out samples are routed) is tested everywhere.
The subprocess protocol itself is tested against a stand-in in tests/test_rkllm_protocol.py. Nothing
here produces toolkit results."""

from __future__ import annotations

import json

import numpy as np
import pytest

from board.errors import InputError, RuntimeUnavailable
from host import decoder_rkllm as R
from host import rkllm_runner as runner


def _toolkit_reason() -> str | None:
    try:
        R.require_rkllm_toolkit()
    except RuntimeUnavailable as exc:
        return f"rkllm-toolkit {R.TOOLKIT_VERSION} unavailable: {exc.message} (Rockchip's wheel: see README)"
    if R.require_rkllm_toolkit().get("standin"):
        return "the toolkit interpreter runs the tests' stand-in, not Rockchip's rkllm-toolkit"
    return None


TOOLKIT_MISSING = _toolkit_reason()
needs_toolkit = pytest.mark.skipif(TOOLKIT_MISSING is not None, reason=TOOLKIT_MISSING or "")


@pytest.mark.parametrize("value", [32, 4096, "8192", 16384])
def test_max_context_accepted(value):
    assert R.validate_max_context(value) == int(value)


@pytest.mark.parametrize("value,message", [
    (0, "multiple of 32"), (100, "try --max-context 96"), (16385, "try --max-context 16384"),
    (32768, "between 32 and 16384"), ("4k", "whole number"), (4096.5, "whole number"),
])
def test_max_context_refused(value, message):
    with pytest.raises(InputError) as info:
        R.validate_max_context(value)
    assert message in str(info.value)


def test_max_context_bounded_by_the_model():
    assert R.validate_max_context(8192, model_max=8192) == 8192
    with pytest.raises(InputError, match="use at most 8192"):
        R.validate_max_context(8224, model_max=8192)


@pytest.mark.skipif(TOOLKIT_MISSING is None, reason="rkllm-toolkit is installed here")
def test_absent_toolkit_says_how_to_install_it():
    with pytest.raises(RuntimeUnavailable) as info:
        R.require_rkllm_toolkit()
    hint = info.value.hint
    for words in ("airockchip/rknn-llm", "v1.3.0", "rkllm-toolkit/packages/", "cp311", "scripts/setup_rkllm_toolkit.sh",
                  ".venv-rkllm", "torch==2.6.0", "--skip-decoder"):
        assert words in hint, words
    with pytest.raises(RuntimeUnavailable):
        R.build_decoder_rkllm("folder", "dataset.json", "out.rkllm")


def test_logit_agreement():
    rng = np.random.default_rng(0)
    ref = rng.normal(size=(12, 50)).astype(np.float32)
    same = runner.logit_agreement(ref, ref)
    assert same["top1_agreement"] == 1.0 and same["last_token_top1_match"] and abs(same["kl_mean"]) < 1e-9
    assert same["cosine_mean"] == pytest.approx(1.0)
    noisy = runner.logit_agreement(ref + rng.normal(scale=3.0, size=ref.shape).astype(np.float32), ref)
    assert noisy["top1_agreement"] < 1.0 and noisy["kl_mean"] > 0.01 and noisy["positions"] == 12


class _NoEmbedsGetLogits:
    """Stands in for a toolkit whose get_logits refuses embeddings, to test OUR routing of held-out samples:
    its 'logits' are the reference's own, so it proves nothing about quantization and is never reported."""

    def __init__(self, decoder):
        self.decoder = decoder

    def get_logits(self, inputs):
        import torch

        if "inputs_embeds" in inputs:
            raise TypeError("inputs_embeds not supported")
        with torch.no_grad():
            return self.decoder(input_ids=inputs["input_ids"]).logits


def test_holdout_routing_when_get_logits_takes_no_embeddings(tiny_checkpoint, tmp_path):
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    from host.checkpoint import load_checkpoint
    from host.decoder_export import export_decoder, load_decoder

    ck = load_checkpoint(tiny_checkpoint("256m"))
    model, tokenizer = ck.load_model(), ck.load_tokenizer()
    export_decoder(model, tokenizer, tmp_path, eos_ids=[tokenizer.convert_tokens_to_ids("<end_of_utterance>")])
    decoder = load_decoder(tmp_path)
    table = decoder.get_input_embeddings().weight.detach().numpy()
    ids = np.asarray(tokenizer.encode("<|im_start|>User: hi<end_of_utterance>\nAssistant:"), np.int64)
    holdout = [
        {"name": "text", "kind": "text", "embeds": table[ids], "input_ids": ids},
        {"name": "image", "kind": "image", "embeds": table[ids], "input_ids": ids},
    ]
    report = runner.evaluate_holdout(_NoEmbedsGetLogits(decoder), decoder, holdout)
    assert report["measured"] == 1 and report["samples"][0]["input"] == "input_ids"
    assert report["not_measured"][0]["name"] == "image"
    assert "inputs_embeds" in report["not_measured"][0]["reason"]


@needs_toolkit
def test_real_toolkit_builds_and_measures_the_tiny_decoder(tiny_checkpoint, tmp_path):
    """rkllm-toolkit 1.3.0 quantizes the tiny decoder from our calibration json and runs it on x86."""
    from tokenizers import Tokenizer

    from board.tiles import SplitSettings
    from calibration import decoder_dataset as D
    from calibration.vision_tiles import default_images
    from host.checkpoint import load_checkpoint
    from host.decoder_export import export_decoder, load_decoder
    from host.prompt_format import prompt_format_from_processor, tokenizer_json
    from host.vision_export import reference_features, vision_tower

    ck = load_checkpoint(tiny_checkpoint("256m"))
    processor, model = ck.load_processor(), ck.load_model()
    fmt = prompt_format_from_processor(processor, ck.chat_template)
    eos = [processor.tokenizer.convert_tokens_to_ids("<end_of_utterance>")]
    folder = tmp_path / "decoder"
    export_decoder(model, processor.tokenizer, folder, eos_ids=eos)
    settings = SplitSettings.from_preprocessor(ck.preprocessor)
    tower = vision_tower(model.model.vision_model, model.model.connector)
    builder = D.SequenceBuilder(
        fmt=fmt, tokenizer=Tokenizer.from_str(tokenizer_json(processor.tokenizer)),
        image_token_id=processor.image_token_id, settings=settings,
        table=model.model.text_model.embed_tokens.weight.detach().numpy().astype(np.float16),
        features=lambda tiles: reference_features(tower, tiles, settings),
    )
    D.build_decoder_calibration(
        tmp_path, builder=builder, decoder=load_decoder(folder), tokenizer=builder.tokenizer, eos_ids=eos,
        images=default_images("calibration")[:4], holdout_images=default_images("holdout")[:2], calibration_tiles=8,
        holdout_tiles=4, max_new_tokens=4,
    )
    report = R.build_decoder_rkllm(folder, tmp_path / D.dataset_file("samples"), tmp_path / "decoder.rkllm",
                                   options=R.RKLLMOptions(max_context=512), holdout=tmp_path / D.HOLDOUT)
    assert (tmp_path / "decoder.rkllm").stat().st_size > 0
    written = json.loads((tmp_path / "decoder.accuracy.json").read_text())
    assert written["model"] == "decoder.rkllm" and written["toolkit"] == R.TOOLKIT_VERSION
    assert written["calibration"]["read_by_toolkit"]["sample_files"] == written["calibration"]["samples"]
    accuracy = report["accuracy"]
    assert accuracy["measured"] >= 1, accuracy
    assert 0.0 <= accuracy["top1_agreement_mean"] <= 1.0


@needs_toolkit
def test_real_toolkit_through_the_convert_command(tmp_path):
    from board import bundle as B
    from board import bundle_schema as S
    from host import convert

    code = convert.main(["--tiny", "256m", "--out", str(tmp_path / "b"), "--max-context", "512",
                         "--decoder-calibration-tiles", "8", "--decoder-target-tokens", "4", "--quiet"])
    assert code == 0
    bundle = B.Bundle.open(tmp_path / "b", need_decoder=True)
    assert bundle.has_decoder and bundle.manifest[S.Manifest.DECODER][S.Decoder.QUANTIZED_DTYPE] == "w8a8"
