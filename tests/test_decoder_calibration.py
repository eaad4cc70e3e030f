"""The decoder calibration set: the board's sequences (checked against transformers' processor and model),
written in the layout rkllm-toolkit reads, within its budgets."""

from __future__ import annotations

import json
import pickle

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from PIL import Image, ImageOps  # noqa: E402
from tokenizers import Tokenizer  # noqa: E402

from board.errors import PromptError  # noqa: E402
from board.tiles import SplitSettings  # noqa: E402
from calibration import decoder_dataset as D  # noqa: E402
from calibration.vision_tiles import default_images  # noqa: E402
from host.checkpoint import load_checkpoint  # noqa: E402
from host.decoder_export import export_decoder, load_decoder  # noqa: E402
from host.prompt_format import prompt_format_from_processor, tokenizer_json  # noqa: E402
from host.vision_export import reference_features, vision_tower  # noqa: E402

N_IMAGES = 3


@pytest.fixture(scope="module")
def setup(tiny_checkpoint, tmp_path_factory):
    ck = load_checkpoint(tiny_checkpoint("256m"))
    processor = ck.load_processor()
    model = ck.load_model()
    fmt = prompt_format_from_processor(processor, ck.chat_template)
    tokenizer = Tokenizer.from_str(tokenizer_json(processor.tokenizer))
    settings = SplitSettings.from_preprocessor(ck.preprocessor)
    tower = vision_tower(model.model.vision_model, model.model.connector)
    table = model.model.text_model.embed_tokens.weight.detach().numpy().astype(np.float16)
    eos = [processor.tokenizer.convert_tokens_to_ids("<end_of_utterance>")]
    folder = tmp_path_factory.mktemp("decoder")
    export_decoder(model, processor.tokenizer, folder, eos_ids=eos)

    def builder():
        return D.SequenceBuilder(fmt=fmt, tokenizer=tokenizer, image_token_id=processor.image_token_id,
                                 settings=settings, table=table,
                                 features=lambda tiles: reference_features(tower, tiles, settings))

    images = default_images("calibration")[:N_IMAGES]
    plan = D.plan_conversations(images, D.TEXT_ONLY[:3])
    samples = D.build_samples(plan, builder(), max_reference_tiles=40, max_tokens=10_000)
    D.generate_targets(samples, load_decoder(folder), tokenizer, eos, max_new_tokens=3)
    out = tmp_path_factory.mktemp("calibration")
    written = D.write_rkllm_dataset(samples, out / D.DATASET)
    return dict(ck=ck, processor=processor, model=model, fmt=fmt, tokenizer=tokenizer, settings=settings,
                table=table, eos=eos, folder=folder, builder=builder, plan=plan, samples=samples, out=out,
                written=written, images=images)


def test_plan_covers_every_image_and_shape():
    images = default_images("calibration")
    plan = D.plan_conversations(images, D.TEXT_ONLY[:4])
    budgets = [c.tiles_per_side for c in plan if c.images]
    assert budgets[:2] == [None, 2], "long sequences (full split, 2x2) come first so a budget cut keeps them"
    single = [c for c in plan if len(c.images) == 1 and c.tiles_per_side == 0]
    assert [c.images[0] for c in single] == images
    assert sum(len(c.images) == 2 for c in plan) == 1
    assert sum(not c.images for c in plan) == 4
    roles = {tuple(m["role"] for m in c.messages) for c in plan if c.images}
    assert {("user",), ("system", "user"), ("user", "assistant", "user")} <= roles


def _reference(setup, conv):
    """transformers' processor + model for one conversation: input_ids and the merged inputs_embeds."""
    processor, model = setup["processor"], setup["model"]
    kwargs = {}
    if conv.tiles_per_side == 0:
        kwargs["do_image_splitting"] = False
    elif conv.tiles_per_side is not None:
        kwargs["size"] = {"longest_edge": conv.tiles_per_side * setup["settings"].tile}
    text = processor.apply_chat_template(list(conv.messages), add_generation_prompt=True)
    images = [ImageOps.exif_transpose(Image.open(p)) for p in conv.images] or None
    inputs = processor(text=text, images=images, return_tensors="pt", **kwargs)
    inner = model.model
    with torch.no_grad():
        embeds = inner.get_input_embeddings()(inputs["input_ids"])
        if "pixel_values" in inputs:
            feats = inner.get_image_features(inputs["pixel_values"], inputs.get("pixel_attention_mask")).pooler_output
            embeds = inner.inputs_merger(inputs["input_ids"], embeds, torch.cat(list(feats)))
    return inputs["input_ids"][0].numpy(), embeds[0].numpy()


def test_sequences_match_the_reference_processor_and_model(setup):
    """Same token ids as transformers' processor, image rows at the image-token positions equal to the
    reference's merged embeddings, text rows the fp16 table's."""
    by_name = {c.name: c for c in setup["plan"]}
    image_id = setup["processor"].image_token_id
    checked = 0
    for sample in setup["samples"]:
        conv = by_name[sample.name]
        ref_ids, ref_embeds = _reference(setup, conv)
        assert sample.input_ids.tolist() == ref_ids.tolist(), sample.name
        positions = np.flatnonzero(ref_ids == image_id)
        assert sample.image_positions.tolist() == positions.tolist()
        assert positions.size == sample.tiles * setup["fmt"].image_seq_len
        text_rows = np.setdiff1d(np.arange(len(ref_ids)), positions)
        np.testing.assert_array_equal(sample.embeds[text_rows], setup["table"][ref_ids[text_rows]].astype(np.float32))
        if positions.size:  # the board's float32 resampling puts a rare pixel one level off Pillow's
            diff = np.abs(sample.embeds[positions] - ref_embeds[positions])  # (board.resample): ~3e-3 at most
            assert diff.mean() < 1e-4 and diff.max() < 1e-2, (sample.name, diff.mean(), diff.max())
        checked += 1
    assert checked == len(setup["samples"]) >= N_IMAGES + 3


def test_dataset_file_is_the_toolkit_layout(setup):
    entries = json.loads((setup["out"] / D.DATASET).read_text())
    samples, hidden = setup["samples"], setup["table"].shape[1]
    assert isinstance(entries, list) and len(entries) == len(samples) == setup["written"]["samples"]
    for entry, sample in zip(entries, samples):
        assert set(entry) == {"input_embed", "target"}
        embed = np.asarray(entry["input_embed"], np.float32)
        assert embed.shape == (1, sample.tokens, hidden)
        np.testing.assert_allclose(embed[0], sample.embeds, rtol=1e-5, atol=1e-7)  # 6 significant digits
        assert isinstance(entry["target"], str) and entry["target"] == sample.target
        assert 1 <= len(sample.target_ids) <= 3 and setup["eos"][0] not in sample.target_ids
    assert D.validate_rkllm_dataset(setup["out"] / D.DATASET, hidden) == {
        "samples": len(samples), "tokens": sum(s.tokens for s in samples)}
    kinds = [s.kind for s in samples]
    assert kinds.count("text") == 3 and kinds.count("image") == len(samples) - 3


def test_targets_are_the_reference_decoders_greedy_answers(setup):
    decoder = load_decoder(setup["folder"])
    sample = setup["samples"][0]
    seq = torch.from_numpy(sample.embeds)[None]
    ids = []
    with torch.no_grad():
        for _ in range(len(sample.target_ids)):
            token = int(decoder(inputs_embeds=seq).logits[0, -1].argmax())
            ids.append(token)
            seq = torch.cat([seq, decoder.get_input_embeddings()(torch.tensor([[token]]))], dim=1)
    assert ids == sample.target_ids


def test_budgets_are_respected(setup):
    plan = D.plan_conversations(setup["images"], D.TEXT_ONLY[:2])
    builder = setup["builder"]()
    few = D.build_samples(plan, builder, max_reference_tiles=3, max_tokens=10_000)
    assert builder.reference_tiles <= 3  # the budget is tiles run through the tower; repeats come from its cache
    assert sum(s.tiles for s in few) >= builder.reference_tiles
    assert any(s.kind == "text" for s in few)
    short = D.build_samples(plan, setup["builder"](), max_reference_tiles=100, max_tokens=300)
    assert sum(s.tokens for s in short) <= 300
    with pytest.raises(ValueError, match="budget"):
        D.build_samples(plan, setup["builder"](), max_reference_tiles=0, max_tokens=5)


def test_image_rows_are_count_checked_before_merging(setup):
    """Samples go through the board's build_sequence: a vision output with a row too few per tile is
    refused with the board's message instead of being merged."""
    fmt, hidden = setup["fmt"], setup["table"].shape[1]
    short = D.SequenceBuilder(fmt=fmt, tokenizer=setup["tokenizer"], image_token_id=setup["processor"].image_token_id,
                              settings=setup["settings"], table=setup["table"],
                              features=lambda tiles: np.zeros((len(tiles), fmt.image_seq_len - 1, hidden), np.float32))
    conv = next(c for c in setup["plan"] if len(c.images) == 1 and c.tiles_per_side == 0)
    with pytest.raises(PromptError, match="image slots but the vision encoder gave"):
        short.build(conv)


def test_validate_rejects_wrong_layouts(tmp_path):
    cases = {
        "not-list": {"input": "x", "target": "y"},
        "no-target": [{"input": "x"}],
        "bad-shape": [{"input_embed": [[1.0, 2.0]], "target": ""}],
        "wrong-hidden": [{"input_embed": [[[1.0, 2.0, 3.0]]], "target": ""}],
        "neither": [{"target": ""}],
    }
    for name, content in cases.items():
        path = tmp_path / f"{name}.json"
        path.write_text(json.dumps(content))
        with pytest.raises(ValueError):
            D.validate_rkllm_dataset(path, 2)
    ok = tmp_path / "ok.json"
    ok.write_text(json.dumps([{"input": "<|im_start|>User: hi", "target": "hello"},
                              {"input_embed": [[[0.5, 0.25]]], "target": "x"}]))
    assert D.validate_rkllm_dataset(ok, 2) == {"samples": 2, "tokens": 1}


@pytest.mark.parametrize("layout", D.LAYOUTS)
def test_whole_step_writes_the_chosen_layout_meta_and_holdout(setup, tmp_path, layout):
    from host.rkllm_runner import check_sample_index

    calibration, holdout = setup["images"][:2], default_images("holdout")[:2]
    (tmp_path / D.DATASET).write_text("[]")  # an earlier run's other layout goes
    report = D.build_decoder_calibration(
        tmp_path, builder=setup["builder"](), decoder=load_decoder(setup["folder"]), tokenizer=setup["tokenizer"],
        eos_ids=setup["eos"], images=calibration, holdout_images=holdout, calibration_tiles=40, holdout_tiles=40,
        max_new_tokens=2, layout=layout,
    )
    hidden = setup["table"].shape[1]
    assert report["layout"] == layout and report["dataset"]["file"] == D.dataset_file(layout)
    assert report["text_samples"] == len(D.TEXT_ONLY) - D.HOLDOUT_TEXT
    if layout == "input_embed":
        assert D.validate_rkllm_dataset(tmp_path / D.DATASET, hidden)["samples"] == report["samples"]
        assert report["dataset"]["bytes"] == (tmp_path / D.DATASET).stat().st_size
        assert not (tmp_path / D.dataset_file("samples")).exists()
    else:
        # Rockchip's 1.3.0 example layout: an index of {"sample", "token_nums"}, one pickle of forward kwargs each,
        # read back as the toolkit's venv reads it
        assert not (tmp_path / D.DATASET).exists()
        index = json.loads((tmp_path / D.dataset_file(layout)).read_text())
        assert check_sample_index(tmp_path / D.dataset_file(layout), hidden)["samples"] == len(index) == report["samples"]
        meta = json.loads((tmp_path / D.DATASET_META).read_text())["samples"]
        for item, row in zip(index, meta):
            assert item["sample"].startswith(D.SAMPLE_LAYOUT + "/") and item["token_nums"] == row["tokens"]
            with open(tmp_path / item["sample"], "rb") as f:
                kwargs = pickle.load(f)
            assert kwargs["inputs_embeds"].shape == (1, item["token_nums"], hidden)
            assert kwargs["position_ids"][0].tolist() == list(range(item["token_nums"]))
            assert kwargs["attention_mask"].sum() == item["token_nums"]

    meta = json.loads((tmp_path / D.DATASET_META).read_text())
    assert len(meta["samples"]) == report["samples"]
    assert {img for s in meta["samples"] for img in s["images"]} == {p.name for p in calibration}

    held = D.load_holdout(tmp_path / D.HOLDOUT)
    assert len(held) == report["holdout"]["samples"]
    assert {img for s in held for img in s["images"]} == {p.name for p in holdout}, "held-out images never calibrate"
    assert sum(s["kind"] == "text" for s in held) == D.HOLDOUT_TEXT
    for s in held:
        assert s["embeds"].shape == (s["tokens"], hidden) and s["input_ids"].shape == (s["tokens"],)
        assert (s["input_ids"][s["image_positions"]] == setup["processor"].image_token_id).all()


def test_a_sample_layout_entry_that_does_not_match_its_pickle_is_refused(setup, tmp_path):
    from host.rkllm_runner import check_sample_index

    samples = setup["samples"][:2]
    D.write_sample_layout(samples, tmp_path / D.SAMPLE_LAYOUT)
    index_path = tmp_path / D.dataset_file("samples")
    index = json.loads(index_path.read_text())
    index[1]["token_nums"] += 1
    index_path.write_text(json.dumps(index))
    with pytest.raises(ValueError, match=r"sample_1: inputs_embeds has shape"):
        check_sample_index(index_path, setup["table"].shape[1])
    with pytest.raises(ValueError, match="unknown calibration layout|must be one of"):
        D.dataset_file("pickles")
