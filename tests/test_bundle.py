"""The bundle format: what host.convert writes, board.bundle.Bundle reads back, and every tampering the
reader must refuse with a message that says what to do.

The bundle here is written by host.convert's own stage functions (text assets, decoder folder,
manifest) from a tiny checkpoint; vision.rknn and decoder.rkllm are placeholder bytes, because the
reader only checks their presence and checksums (the real builds are tested in test_convert.py and
test_vision_rknn.py).
"""

from __future__ import annotations

import argparse
import json
import shutil
from dataclasses import asdict

import numpy as np
import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")

from board import bundle as B  # noqa: E402
from board.errors import BundleError  # noqa: E402
from board.tiles import SplitSettings  # noqa: E402

PLACEHOLDER_RKNN = b"placeholder vision.rknn: the reader checks checksums only\n"
PLACEHOLDER_RKLLM = b"placeholder decoder.rkllm: the reader checks checksums only\n"


def make_bundle(root, checkpoint_dir, *, with_decoder: bool):
    from host.convert import Job, Log, stage_decoder, stage_manifest, stage_text
    from host.decoder_rkllm import RKLLMOptions

    args = argparse.Namespace(tiny=None, model=str(checkpoint_dir), revision=None, calibration=None)
    job = Job(args, root, Log(quiet=True))
    (root / B.HOST_DIR).mkdir(parents=True)
    text = stage_text(job)
    stage_decoder(job, text)
    (root / B.VISION_RKNN).write_bytes(PLACEHOLDER_RKNN)
    vision = {"section": {"file": B.VISION_RKNN, "dtype": "fp16", "layout": "conv", "tile": job.settings.tile,
                          "tokens_per_tile": job.checkpoint.image_seq_len}}
    rkllm = None
    if with_decoder:
        (root / B.DECODER_RKLLM).write_bytes(PLACEHOLDER_RKLLM)
        rkllm = {"options": asdict(RKLLMOptions(max_context=2048)), "toolkit": None}
    stage_manifest(job, text, vision, rkllm, 2048)
    return root, job, text


@pytest.fixture(scope="module")
def pristine(tiny_checkpoint, tmp_path_factory):
    root, job, text = make_bundle(tmp_path_factory.mktemp("bundle") / "b", tiny_checkpoint("256m"), with_decoder=True)
    return {"root": root, "job": job, "text": text}


@pytest.fixture
def bundle_copy(pristine, tmp_path):
    target = tmp_path / "copy"
    shutil.copytree(pristine["root"], target)
    return target


def _manifest(root):
    return json.loads((root / B.MANIFEST).read_text())


def _write_manifest(root, manifest):
    (root / B.MANIFEST).write_text(json.dumps(manifest))


def _refused(root, match, **kwargs):
    with pytest.raises(BundleError, match=match) as info:
        B.Bundle.open(root, **kwargs)
    assert info.value.hint, "every refusal says what to do"
    return info.value


def test_round_trip(pristine):
    root, job, text = pristine["root"], pristine["job"], pristine["text"]
    bundle = B.Bundle.open(root, need_decoder=True)
    assert bundle.has_decoder and bundle.max_context == 2048
    assert bundle.prompt_format.to_dict() == text["prompt_format"]
    assert bundle.split_settings == SplitSettings.from_preprocessor(job.checkpoint.preprocessor)
    eot = job.processor.tokenizer.convert_tokens_to_ids("<end_of_utterance>")
    assert bundle.eos_token_ids[0] == eot
    assert bundle.image_token_id == job.processor.image_token_id
    table = bundle.embeddings()
    reference = job.model.model.text_model.embed_tokens.weight.detach().numpy()
    assert table.dtype == np.float16 and table.shape == reference.shape == (reference.shape[0], bundle.hidden_size)
    np.testing.assert_array_equal(table, reference.astype(np.float16))
    text_in = "<|im_start|>User:<image>What is in this image?<end_of_utterance>\nAssistant:"
    assert bundle.tokenizer().encode(text_in).ids == job.processor.tokenizer.encode(text_in)
    manifest = bundle.manifest
    assert manifest[B.K_VERSION] == B.FORMAT_VERSION and manifest[B.K_FORMAT] == B.FORMAT_NAME
    assert manifest[B.K_MODEL]["tiny"] is True and "noise" in manifest[B.K_MODEL]["note"]
    assert manifest[B.K_TOOLKITS]["transformers"] and manifest[B.K_TOOLKITS]["torch"]
    # every file, board and host side, has a checksum; host files are verified on use
    files = manifest[B.K_FILES]
    assert {B.VISION_RKNN, B.DECODER_RKLLM, B.EMBEDDINGS, B.TOKENIZER} <= set(files)
    assert any(rel.startswith(B.DECODER_HF + "/") for rel in files)
    assert bundle.verify_host_files(B.DECODER_HF) == root / B.DECODER_HF
    assert set(bundle.board_files()) == {B.VISION_RKNN, B.DECODER_RKLLM, B.EMBEDDINGS, B.TOKENIZER}


def test_skip_decoder_bundle(tiny_checkpoint, tmp_path):
    root, _, _ = make_bundle(tmp_path / "b", tiny_checkpoint("256m"), with_decoder=False)
    bundle = B.Bundle.open(root)
    assert not bundle.has_decoder and B.DECODER_RKLLM not in bundle.manifest[B.K_FILES]
    assert "--skip-decoder" in bundle.manifest[B.K_DECODER]["missing"]
    err = _refused(root, "skip-decoder", need_decoder=True)
    assert "rkllm-toolkit" in err.hint


@pytest.mark.parametrize("rel", [B.VISION_RKNN, B.DECODER_RKLLM, B.EMBEDDINGS, B.TOKENIZER])
def test_missing_file(bundle_copy, rel):
    (bundle_copy / rel).unlink()
    err = _refused(bundle_copy, f"missing {rel}")
    assert "copy the bundle folder again" in err.hint


@pytest.mark.parametrize("rel", [B.VISION_RKNN, B.DECODER_RKLLM, B.EMBEDDINGS, B.TOKENIZER])
def test_wrong_checksum_same_size(bundle_copy, rel):
    data = bytearray((bundle_copy / rel).read_bytes())
    data[len(data) // 2] ^= 0x01
    (bundle_copy / rel).write_bytes(bytes(data))
    _refused(bundle_copy, f"{rel} does not match its checksum")


@pytest.mark.parametrize("rel", [B.VISION_RKNN, B.EMBEDDINGS])
def test_truncated(bundle_copy, rel):
    data = (bundle_copy / rel).read_bytes()
    (bundle_copy / rel).write_bytes(data[: len(data) // 2])
    _refused(bundle_copy, "does not match its checksum")


def test_tampered_host_file_is_caught_when_used(bundle_copy):
    config = bundle_copy / B.DECODER_HF / "config.json"
    config.write_text(config.read_text().replace('"num_hidden_layers": 2', '"num_hidden_layers": 1'))
    bundle = B.Bundle.open(bundle_copy)  # the board does not read host/
    with pytest.raises(BundleError, match="config.json does not match its checksum"):
        bundle.verify_host_files(B.DECODER_HF)


@pytest.mark.parametrize("version,hint", [(B.FORMAT_VERSION + 1, "update this software"), (0, "re-create it")])
def test_wrong_format_version(bundle_copy, version, hint):
    manifest = _manifest(bundle_copy)
    manifest[B.K_VERSION] = version
    _write_manifest(bundle_copy, manifest)
    err = _refused(bundle_copy, f"format version {version}")
    assert hint in err.hint


def test_corrupt_manifest(bundle_copy):
    text = (bundle_copy / B.MANIFEST).read_text()
    (bundle_copy / B.MANIFEST).write_text(text[: len(text) // 2])
    _refused(bundle_copy, "is corrupt")
    (bundle_copy / B.MANIFEST).write_bytes(b"\xff\xfe\x00garbage")
    _refused(bundle_copy, "is corrupt")
    (bundle_copy / B.MANIFEST).write_text("[1, 2, 3]")
    _refused(bundle_copy, "not a smolvlm-rk3588-bundle manifest")


def test_not_a_bundle(tmp_path):
    _refused(tmp_path / "nowhere", "bundle folder not found")
    _refused(tmp_path, "not a bundle")


@pytest.mark.parametrize("key", [B.K_MODEL, B.K_VISION, B.K_DECODER, B.K_EMBEDDINGS, B.K_TOKENIZER, B.K_PROMPT,
                                 B.K_PREPROCESSOR, B.K_FILES])
def test_manifest_lacks_a_section(bundle_copy, key):
    manifest = _manifest(bundle_copy)
    del manifest[key]
    _write_manifest(bundle_copy, manifest)
    _refused(bundle_copy, f"lacks '{key}'")


def test_manifest_lacks_generation(bundle_copy):
    manifest = _manifest(bundle_copy)
    del manifest[B.K_GENERATION]
    _write_manifest(bundle_copy, manifest)
    _refused(bundle_copy, "lacks or garbles a setting")


def test_wrong_embeddings_shape_in_manifest(bundle_copy):
    manifest = _manifest(bundle_copy)
    vocab, hidden = manifest[B.K_EMBEDDINGS]["shape"]
    manifest[B.K_EMBEDDINGS]["shape"] = [vocab, hidden + 1]
    _write_manifest(bundle_copy, manifest)
    _refused(bundle_copy, "embedding table is float16")


def test_wrong_embeddings_file_with_matching_checksum(bundle_copy):
    """A table of another shape whose checksum was updated too (e.g. from another model's bundle)."""
    table = np.load(bundle_copy / B.EMBEDDINGS)
    np.save(bundle_copy / B.EMBEDDINGS, table[:-10])
    manifest = _manifest(bundle_copy)
    manifest[B.K_FILES].update(B.file_entries(bundle_copy, [B.EMBEDDINGS]))
    _write_manifest(bundle_copy, manifest)
    _refused(bundle_copy, r"embed_tokens.npy is float16 \[")


def test_hidden_size_disagrees_with_table(bundle_copy):
    manifest = _manifest(bundle_copy)
    manifest[B.K_DECODER]["hidden_size"] += 32
    _write_manifest(bundle_copy, manifest)
    _refused(bundle_copy, "decoder needs")


@pytest.mark.parametrize("field", ["image", "eos", "no-eos"])
def test_token_ids_out_of_range(bundle_copy, field):
    manifest = _manifest(bundle_copy)
    vocab = manifest[B.K_EMBEDDINGS]["shape"][0]
    if field == "image":
        manifest[B.K_TOKENIZER]["image_token_id"] = vocab
    elif field == "eos":
        manifest[B.K_GENERATION]["eos_token_ids"] = [vocab + 5]
    else:
        manifest[B.K_GENERATION]["eos_token_ids"] = []
    _write_manifest(bundle_copy, manifest)
    _refused(bundle_copy, "token ids")


def test_unlisted_file_and_unverified_open(bundle_copy):
    bundle = B.Bundle.open(bundle_copy)
    with pytest.raises(BundleError, match="not listed"):
        bundle.verify(["extra.bin"])
    # verify=False skips hashing (a fast start) but still checks the settings and the table's header
    (bundle_copy / B.VISION_RKNN).write_bytes(b"changed")
    B.Bundle.open(bundle_copy, verify=False)
    manifest = _manifest(bundle_copy)
    manifest[B.K_EMBEDDINGS]["dtype"] = "float32"
    _write_manifest(bundle_copy, manifest)
    _refused(bundle_copy, "embedding table", verify=False)


def test_incomplete_prompt_format(bundle_copy):
    manifest = _manifest(bundle_copy)
    del manifest[B.K_PROMPT]["roles"]
    _write_manifest(bundle_copy, manifest)
    _refused(bundle_copy, "prompt format is incomplete")


def test_unusable_preprocessor_settings(bundle_copy):
    manifest = _manifest(bundle_copy)
    del manifest[B.K_PREPROCESSOR]["max_image_size"]
    _write_manifest(bundle_copy, manifest)
    _refused(bundle_copy, "preprocessor settings are unusable")
