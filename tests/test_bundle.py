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
from board import bundle_schema as S  # noqa: E402
from board.errors import BundleError  # noqa: E402
from board.tiles import SplitSettings  # noqa: E402

M = S.Manifest

PLACEHOLDER_RKNN = b"placeholder vision.rknn: the reader checks checksums only\n"
PLACEHOLDER_RKLLM = b"placeholder decoder.rkllm: the reader checks checksums only\n"


def make_bundle(root, checkpoint_dir, *, with_decoder: bool):
    from host.convert import Job, Log, stage_decoder, stage_manifest, stage_text
    from host.decoder_rkllm import RKLLMOptions

    args = argparse.Namespace(tiny=None, model=str(checkpoint_dir), revision=None, calibration=None, embed_flash=False)
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
    assert manifest[M.VERSION] == B.FORMAT_VERSION and manifest[M.FORMAT] == B.FORMAT_NAME
    assert manifest[M.MODEL]["tiny"] is True and "noise" in manifest[M.MODEL]["note"]
    assert manifest[M.TOOLKITS]["transformers"] and manifest[M.TOOLKITS]["torch"]
    # every file, board and host side, has a checksum; host files are verified on use
    files = manifest[M.FILES]
    assert {B.VISION_RKNN, B.DECODER_RKLLM, B.EMBEDDINGS, B.TOKENIZER} <= set(files)
    assert any(rel.startswith(B.DECODER_HF + "/") for rel in files)
    assert bundle.verify_host_files(B.DECODER_HF) == root / B.DECODER_HF
    assert set(bundle.board_files()) == {B.VISION_RKNN, B.DECODER_RKLLM, B.EMBEDDINGS, B.TOKENIZER}


def test_skip_decoder_bundle(tiny_checkpoint, tmp_path):
    root, _, _ = make_bundle(tmp_path / "b", tiny_checkpoint("256m"), with_decoder=False)
    bundle = B.Bundle.open(root)
    assert not bundle.has_decoder and B.DECODER_RKLLM not in bundle.manifest[M.FILES]
    assert "--skip-decoder" in bundle.manifest[M.DECODER]["missing"]
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
    manifest[M.VERSION] = version
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


@pytest.mark.parametrize("key", [k for k in S.keys(M) if not k.rule.optional and k not in (M.FORMAT, M.VERSION)])
def test_manifest_lacks_a_section(bundle_copy, key):
    manifest = _manifest(bundle_copy)
    del manifest[key]
    _write_manifest(bundle_copy, manifest)
    _refused(bundle_copy, rf"manifest\.{key} is missing")


def test_wrong_embeddings_shape_in_manifest(bundle_copy):
    manifest = _manifest(bundle_copy)
    vocab, hidden = manifest[M.EMBEDDINGS]["shape"]
    manifest[M.EMBEDDINGS]["shape"] = [vocab, hidden + 1]
    _write_manifest(bundle_copy, manifest)
    _refused(bundle_copy, "embedding table is float16")


def test_wrong_embeddings_file_with_matching_checksum(bundle_copy):
    """A table of another shape whose checksum was updated too (e.g. from another model's bundle)."""
    table = np.load(bundle_copy / B.EMBEDDINGS)
    np.save(bundle_copy / B.EMBEDDINGS, table[:-10])
    manifest = _manifest(bundle_copy)
    manifest[M.FILES].update(B.file_entries(bundle_copy, [B.EMBEDDINGS]))
    _write_manifest(bundle_copy, manifest)
    _refused(bundle_copy, r"embed_tokens.npy is float16 \[")


def test_hidden_size_disagrees_with_table(bundle_copy):
    manifest = _manifest(bundle_copy)
    manifest[M.DECODER]["hidden_size"] += 32
    _write_manifest(bundle_copy, manifest)
    _refused(bundle_copy, "decoder needs")


@pytest.mark.parametrize("field", ["image", "eos", "no-eos"])
def test_token_ids_out_of_range(bundle_copy, field):
    manifest = _manifest(bundle_copy)
    vocab = manifest[M.EMBEDDINGS]["shape"][0]
    if field == "image":
        manifest[M.TOKENIZER]["image_token_id"] = vocab
    elif field == "eos":
        manifest[M.GENERATION]["eos_token_ids"] = [vocab + 5]
    else:
        manifest[M.GENERATION]["eos_token_ids"] = []
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
    manifest[M.EMBEDDINGS]["dtype"] = "float32"
    _write_manifest(bundle_copy, manifest)
    _refused(bundle_copy, "embedding table", verify=False)


def test_incomplete_prompt_format(bundle_copy):
    manifest = _manifest(bundle_copy)
    del manifest[M.PROMPT][S.Prompt.ROLES]
    _write_manifest(bundle_copy, manifest)
    _refused(bundle_copy, r"manifest\.prompt_format\.roles is missing")


def test_unusable_preprocessor_settings(bundle_copy):
    manifest = _manifest(bundle_copy)
    del manifest[M.PREPROCESSOR]["max_image_size"]
    _write_manifest(bundle_copy, manifest)
    _refused(bundle_copy, "preprocessor settings are unusable")


# -- the schema: every value the board relies on has a type, and a refusal names its key path ----------

_DELETE = object()
V, D, FE = S.Vision, S.Decoder, S.FileEntry


def _edit(root, path, value):
    """Set (or delete) manifest[path[0]][path[1]]... and write the manifest back."""
    manifest = _manifest(root)
    table = manifest
    for key in path[:-1]:
        table = table[key]
    if value is _DELETE:
        del table[path[-1]]
    else:
        table[path[-1]] = value
    _write_manifest(root, manifest)


@pytest.mark.parametrize("path,value,message", [
    ((M.FILES,), [B.VISION_RKNN], r"manifest\.files must be a table \(JSON object\), not \["),
    ((M.FILES, B.VISION_RKNN), "abc", r'manifest\.files\["vision\.rknn"\] must be a table'),
    ((M.FILES, B.VISION_RKNN, FE.SHA256), _DELETE, r'manifest\.files\["vision\.rknn"\]\.sha256 is missing'),
    ((M.FILES, B.VISION_RKNN, FE.BYTES), _DELETE, r'manifest\.files\["vision\.rknn"\]\.bytes is missing'),
    ((M.FILES, B.VISION_RKNN, FE.SHA256), 12345, r'manifest\.files\["vision\.rknn"\]\.sha256 must be a string'),
    ((M.FILES, B.TOKENIZER, FE.BYTES), "2048", r'manifest\.files\["tokenizer\.json"\]\.bytes must be an integer'),
    ((M.FILES, B.TOKENIZER, FE.BYTES), -1, r'manifest\.files\["tokenizer\.json"\]\.bytes is -1; it must be at least 0'),
    ((M.MODEL, S.Model.ID), 7, r"manifest\.model\.id must be a string, not 7"),
    ((M.MODEL, S.Model.ID), None, r"manifest\.model\.id is null"),
    ((M.MODEL,), "tiny", r"manifest\.model must be a table"),
    ((M.VERSION,), True, r"manifest\.format_version must be an integer, not true"),
    ((M.VERSION,), 1.0, r"manifest\.format_version must be an integer, not 1\.0"),
    ((M.VERSION,), "1", r'manifest\.format_version must be an integer, not "1"'),
    ((M.VERSION,), _DELETE, r"manifest\.format_version is missing"),
    ((M.DECODER, D.MAX_CONTEXT), 0, r"manifest\.decoder\.max_context is 0; it must be at least 1"),
    ((M.DECODER, D.MAX_CONTEXT), -4096, r"manifest\.decoder\.max_context is -4096; it must be at least 1"),
    ((M.DECODER, D.MAX_CONTEXT), 2048.5, r"manifest\.decoder\.max_context must be an integer, not 2048\.5"),
    ((M.DECODER, D.HIDDEN_SIZE), "64", r'manifest\.decoder\.hidden_size must be an integer, not "64"'),
    ((M.DECODER, D.HIDDEN_SIZE), 0, r"manifest\.decoder\.hidden_size is 0; it must be at least 1"),
    ((M.VISION, V.TOKENS_PER_TILE), 0, r"manifest\.vision\.tokens_per_tile is 0; it must be at least 1"),
    ((M.VISION, V.TILE), True, r"manifest\.vision\.tile must be an integer, not true"),
    ((M.TOKENIZER, S.Tokenizer.IMAGE_TOKEN_ID), -1, r"manifest\.tokenizer\.image_token_id is -1; it must be at least 0"),
    ((M.TOKENIZER, S.Tokenizer.IMAGE_TOKEN_ID), False, r"manifest\.tokenizer\.image_token_id must be an integer"),
    ((M.GENERATION, S.Generation.EOS_TOKEN_IDS), [1, 2.0], r"manifest\.generation\.eos_token_ids\[1\] must be an integer"),
    ((M.GENERATION, S.Generation.EOS_TOKEN_IDS), 2, r"manifest\.generation\.eos_token_ids must be a list"),
    ((M.EMBEDDINGS, S.Embeddings.SHAPE), [100, "64"], r"manifest\.embeddings\.shape\[1\] must be an integer"),
    ((M.PROMPT, S.Prompt.IMAGE_SEQ_LEN), True, r"manifest\.prompt_format\.image_seq_len must be an integer"),
    ((M.PROMPT, S.Prompt.ROLES, "user"), "User:", r'manifest\.prompt_format\.roles\["user"\] must be a list'),
    ((M.TOKENIZER, S.Tokenizer.SPECIAL_TOKENS, S.SpecialTokens.EOS, S.SpecialToken.ID), "2",
     r"manifest\.tokenizer\.special_tokens\.eos\.id must be an integer"),
])
def test_schema_refuses_with_the_key_path(bundle_copy, path, value, message):
    _edit(bundle_copy, path, value)
    err = _refused(bundle_copy, message, verify=False)
    assert "host.convert" in err.hint


def test_prompt_section_names_every_prompt_format_field():
    """The schema's prompt_format keys are PromptFormat's fields (to_dict writes them)."""
    from dataclasses import fields

    from board.prompt import PromptFormat

    assert [str(k) for k in S.keys(S.Prompt)] == [f.name for f in fields(PromptFormat)]


def test_writer_refuses_what_the_reader_would(pristine, tmp_path):
    """host.bundle_writer validates the manifest before writing it: a bad value never reaches a board."""
    from host.bundle_writer import write_manifest

    root = tmp_path / "w"
    shutil.copytree(pristine["root"], root)
    manifest = _manifest(root)
    (root / B.MANIFEST).unlink()
    text = pristine["text"]
    with pytest.raises(BundleError, match=r"manifest\.decoder\.max_context is 0"):
        write_manifest(root, checkpoint=pristine["job"].checkpoint, prompt_format=B.PromptFormat.from_dict(text[M.PROMPT]),
                       tokenizer_info=text[M.TOKENIZER], vision=manifest[M.VISION],
                       decoder={**manifest[M.DECODER], D.MAX_CONTEXT: 0}, embeddings=text[M.EMBEDDINGS],
                       generation=text[M.GENERATION])
    assert not (root / B.MANIFEST).exists()


# -- every path stays inside the bundle folder ------------------------------------------------------


def _list_file(root, rel, target):
    """List `rel` in the manifest's files table with the correct checksum of the file at `target`."""
    manifest = _manifest(root)
    manifest[M.FILES][rel] = {FE.SHA256: B.sha256_file(target), FE.BYTES: target.stat().st_size}
    _write_manifest(root, manifest)


def test_dotdot_path_with_its_checksum_is_refused(bundle_copy, tmp_path):
    secret = tmp_path / "secret.txt"  # two levels above the bundle's files, as ../../etc/passwd would be
    secret.write_text("not the bundle's\n")
    _list_file(bundle_copy, "host/../../secret.txt", secret)
    _refused(bundle_copy, r'manifest\.files\["host/\.\./\.\./secret\.txt"\]: the path leaves the bundle folder \(\.\.\)')


def test_absolute_path_is_refused(bundle_copy, tmp_path):
    secret = tmp_path / "secret.txt"
    secret.write_text("not the bundle's\n")
    _list_file(bundle_copy, str(secret), secret)
    _refused(bundle_copy, rf'manifest\.files\["{secret}"\]: the path is an absolute path')


def test_symlink_out_of_the_bundle_is_refused(bundle_copy, tmp_path):
    """The same bytes, checksum correct, but the file lives outside the folder."""
    outside = tmp_path / "elsewhere.rknn"
    shutil.move(bundle_copy / B.VISION_RKNN, outside)
    (bundle_copy / B.VISION_RKNN).symlink_to(outside)
    err = _refused(bundle_copy, r'manifest\.files\["vision\.rknn"\]: vision\.rknn leads to .*elsewhere\.rknn, '
                                r"outside the bundle folder \(a symlink\)")
    assert "copy the file itself into the bundle folder" in err.hint


def test_symlinked_host_folder_out_of_the_bundle_is_refused(bundle_copy, tmp_path):
    outside = tmp_path / "decoder-elsewhere"
    shutil.move(bundle_copy / B.DECODER_HF, outside)
    (bundle_copy / B.DECODER_HF).symlink_to(outside, target_is_directory=True)
    _refused(bundle_copy, r'manifest\.files\["host/decoder/[^"]+"\]: .* outside the bundle folder')


def test_symlink_inside_the_bundle_is_fine(bundle_copy):
    real = bundle_copy / B.HOST_DIR / "tokenizer.json.real"
    shutil.move(bundle_copy / B.TOKENIZER, real)
    (bundle_copy / B.TOKENIZER).symlink_to(real)
    bundle = B.Bundle.open(bundle_copy)
    assert bundle.tokenizer().encode("hello").ids


def test_every_opened_path_is_confined(bundle_copy, tmp_path):
    """Bundle.path (what the pipeline opens vision.rknn, decoder.rkllm and host/ files through) refuses
    a path that leaves the folder, also when it is not listed or a link appears after opening."""
    bundle = B.Bundle.open(bundle_copy)
    for rel, match in (("../x", r"the path '\.\./x' leaves the bundle folder"),
                       ("/etc/passwd", "the path '/etc/passwd' is an absolute path")):
        with pytest.raises(BundleError, match=match):
            bundle.path(rel)
    outside = tmp_path / "vision.onnx"
    outside.write_bytes(b"onnx")
    (bundle_copy / B.VISION_ONNX).symlink_to(outside)
    with pytest.raises(BundleError, match=r"host/vision\.onnx leads to .* outside the bundle folder"):
        bundle.path(B.VISION_ONNX)
    (bundle_copy / B.EMBEDDINGS).unlink()
    (bundle_copy / B.EMBEDDINGS).symlink_to(outside)
    with pytest.raises(BundleError, match="outside the bundle folder"):
        bundle.embeddings()


@pytest.mark.parametrize("path,value", [((M.VISION, V.FILE), "../vision.rknn"), ((M.DECODER, D.HF_FOLDER), "/host/decoder"),
                                        ((M.EMBEDDINGS, S.Embeddings.FILE), "")])
def test_section_file_names_stay_inside(bundle_copy, path, value):
    _edit(bundle_copy, path, value)
    _refused(bundle_copy, rf"manifest\.{path[0]}\.{path[1]} = .* every file must be inside the bundle")


# -- the target: this software's SoC and librkllmrt ABI; the board's SoC and NPU driver ---------------


def test_target_is_written_from_the_runtime_definitions(pristine):
    from board.rkllm_h import RKLLM_VERSION
    from board.system_checks import MIN_NPU_DRIVER, PLATFORM, parse_version

    target = _manifest(pristine["root"])[M.TARGET]
    assert target == B.runtime_target()
    assert target[S.Target.PLATFORM] == PLATFORM and target[S.Target.LIBRKLLMRT] == RKLLM_VERSION
    assert parse_version(target[S.Target.NPU_DRIVER_MIN]) == MIN_NPU_DRIVER


@pytest.mark.parametrize("key,value,message,hint", [
    (S.Target.PLATFORM, "rk3576", r"built for the SoC rk3576 \(manifest\.target\.platform\); this software runs "
     r"rk3588", "host.convert (it builds for rk3588)"),
    (S.Target.LIBRKLLMRT, "1.2.1", r"built for the librkllmrt ABI 1\.2\.1 \(manifest\.target\.librkllmrt\); this "
     r"software runs 1\.3\.0", "host.convert (rkllm-toolkit 1.3.0)"),
    (S.Target.NPU_DRIVER_MIN, "recent", r"manifest\.target\.npu_driver_min = 'recent' is not a version", "host.convert"),
    (S.Target.PLATFORM, 3588, r"manifest\.target\.platform must be a string", "host.convert"),
])
def test_target_mismatch_is_refused(bundle_copy, key, value, message, hint):
    _edit(bundle_copy, (M.TARGET, key), value)
    err = _refused(bundle_copy, message)
    assert hint in err.hint


def _board(tmp_path, soc=b"rockchip,rk3588\0", driver="RKNPU driver: v0.9.8"):
    from board.system_checks import SystemPaths

    paths = SystemPaths(npu_debugfs_version=tmp_path / "debugfs-version", npu_module_version=tmp_path / "nope",
                        npu_procfs_version=tmp_path / "nope", device_tree_compatible=tmp_path / "compatible",
                        mounts=tmp_path / "mounts")
    paths.npu_debugfs_version.write_text(driver)
    paths.device_tree_compatible.write_bytes(soc)
    paths.mounts.write_text("debugfs /sys/kernel/debug debugfs rw 0 0\n")
    return paths


def test_target_against_the_board(bundle_copy, tmp_path):
    from board.system_checks import FAIL, OK

    bundle = B.Bundle.open(bundle_copy)
    assert [r.status for r in bundle.check_board(_board(tmp_path))] == [OK, OK]
    _edit(bundle_copy, (M.TARGET, S.Target.NPU_DRIVER_MIN), "0.9.9")  # a bundle that needs a newer driver
    soc, driver = B.Bundle.open(bundle_copy).check_board(_board(tmp_path))
    assert soc.status == OK and driver.status == FAIL
    assert "NPU driver 0.9.8 is too old; this bundle needs 0.9.9 or newer" in driver.message and driver.hint
    soc, _ = bundle.check_board(_board(tmp_path, soc=b"rockchip,rk3576\0"))
    assert soc.status == FAIL and "not an RK3588" in soc.message


def test_pipeline_checks_the_target_on_the_board_only(bundle_copy, tmp_path, monkeypatch):
    """On a board (run_checks passed) a bundle needing a newer NPU driver stops the load; --emulate does not check it."""
    from board.errors import RuntimeUnavailable
    from board.pipeline import Pipeline
    from board.system_checks import OK, CheckResult

    _edit(bundle_copy, (M.TARGET, S.Target.NPU_DRIVER_MIN), "0.9.9")
    monkeypatch.setattr("board.pipeline.run_checks", lambda **kw: [CheckResult("cpu", OK, "a fake good board")])
    with pytest.raises(RuntimeUnavailable, match="this bundle needs 0.9.9"):
        Pipeline(bundle_copy, system_paths=_board(tmp_path))

    class NoVision:
        def close(self):
            pass

    monkeypatch.undo()
    with Pipeline(bundle_copy, emulate=True, system_paths=_board(tmp_path, soc=b"x86\0"), vision=NoVision()) as pipeline:
        assert pipeline.bundle.max_context == 2048


# -- tokens per tile: the vision model, the prompt format and the splitter agree --------------------


def _geometry(job):
    vision = job.checkpoint.config["vision_config"]
    return int(vision["patch_size"]), int(job.checkpoint.config["scale_factor"])


def test_tokens_per_tile_agree(pristine, bundle_copy):
    patch, scale = _geometry(pristine["job"])
    manifest = _manifest(bundle_copy)
    manifest[M.VISION].update({V.PATCH: patch, V.SCALE_FACTOR: scale})
    _write_manifest(bundle_copy, manifest)
    bundle = B.Bundle.open(bundle_copy)
    assert bundle.vision[V.TOKENS_PER_TILE] == bundle.prompt_format.image_seq_len
    _edit(bundle_copy, (M.VISION, V.SCALE_FACTOR), scale // 2)  # the patch grid merged 2x less per side
    _refused(bundle_copy, rf"manifest\.vision\.tokens_per_tile is {bundle.prompt_format.image_seq_len}, but a "
                          rf"{bundle.split_settings.tile}px tile in {patch}px patches merged")
    _edit(bundle_copy, (M.VISION, V.SCALE_FACTOR), 3)
    _refused(bundle_copy, r"manifest\.vision: .* does not merge 3x3")


@pytest.mark.parametrize("key,message", [
    (V.TOKENS_PER_TILE, r"manifest\.vision\.tokens_per_tile is \d+, but manifest\.prompt_format\.image_seq_len is \d+"),
    (V.TILE, r"manifest\.vision\.tile is \d+, but the preprocessor splits \d+px tiles"),
])
def test_tokens_per_tile_disagree(bundle_copy, key, message):
    manifest = _manifest(bundle_copy)
    manifest[M.VISION][key] += 1
    _write_manifest(bundle_copy, manifest)
    _refused(bundle_copy, message)


def test_manifest_symlinked_out_is_refused(bundle_copy, tmp_path):
    outside = tmp_path / "manifest.json"
    shutil.move(bundle_copy / B.MANIFEST, outside)
    (bundle_copy / B.MANIFEST).symlink_to(outside)
    _refused(bundle_copy, r"manifest\.json leads to .* outside the bundle folder")


def test_unknown_keys_are_ignored_and_a_short_role_is_refused(bundle_copy):
    """A section may grow within one format version; a role without its two prefixes cannot render."""
    manifest = _manifest(bundle_copy)
    manifest[M.PROMPT]["a_later_setting"] = 1
    manifest[M.DECODER]["a_later_setting"] = True
    _write_manifest(bundle_copy, manifest)
    B.Bundle.open(bundle_copy)
    _edit(bundle_copy, (M.PROMPT, S.Prompt.ROLES, "user"), ["User:"])
    _refused(bundle_copy, "prompt format is incomplete")
