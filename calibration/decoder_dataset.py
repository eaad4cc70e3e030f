"""The decoder's W8A8 calibration set: templated SmolVLM conversations with real images, as embeddings.

On the board the decoder never sees text: it gets the whole templated sequence as float32 embedding
rows, text rows from the fp16 table and image rows from the vision encoder (RKLLM_INPUT_EMBED).
Calibration must see the same activations, so each sample is built with the board's own rules:
`board.image_io.load_image` + `board.tiles.split_image` (tile plan), `board.prompt.build_prompt`
(token ids, image positions) and `board.sequence.build_sequence` (rows of the bundle's fp16 embedding
table, the image rows placed at `Prompt.image_positions` after its count check), with the fp32 PyTorch
reference vision tower + connector giving the image rows.
Text-only conversations are built the same way (the board embeds those too). Targets are the fp32
reference decoder's own greedy answers, so calibration also covers the model answering.

Two layouts, one of them written (`layout`, host.convert's --decoder-calibration-layout):

- `samples` (the default): Rockchip's 1.3.0 multimodal example
  (`examples/multimodal_model_demo/data/make_input_embeds_for_quantize.py`) pickles the language
  model's forward kwargs (`inputs_embeds`, `attention_mask`, `position_ids`) one file per sample and
  writes an index `[{"sample": "llm_inputs/sample_i", "token_nums": n}]` (`data/llm_inputs.json`), the
  sample paths relative to the index's folder. Its README and export script then pass
  `dataset='data/inputs.json'`, the name the 1.2.x script wrote: an upstream inconsistency. We hand
  the toolkit the index itself (`decoder_calibration_samples.json` beside the
  `decoder_calibration_samples/` folder): that is the file the 1.3.0 script writes, and the runner
  starts the toolkit in the index's folder so the relative sample paths resolve either way.
- `input_embed`: a JSON list of `{"input_embed": [[[...]]], "target": "..."}`, one nested list
  [1, n_tokens, hidden] per sample, the layout of the example up to rkllm-toolkit 1.2.3 (issue #126).

host/rkllm_runner.py checks from the toolkit's own side that it read the set (see there).

Size: in the `input_embed` JSON every value is written as text (~11 bytes) and the toolkit holds the
parsed lists in RAM (~36 bytes per value as Python floats); the pickles hold float32. The set is
bounded by a number of values (default 12 M: ~130 MB of JSON or 48 MB of pickles, ~0.45 GB parsed;
20k tokens at hidden 576, 5.8k at 2048) and by a number of
reference tiles (the fp32 tower takes ~4 s per 512 tile on 2 cores: 48 tiles ~3.5 min at full size;
`--decoder-calibration-tiles` of host.convert). The default plan spends the tiles on breadth: one
image fully split (the ~900-token sequence the board sends by default) and one split at most 2 tiles
per side (2x2 + global for a square image), one two-image turn, every calibration image once as a
single unsplit tile, and text-only turns.

Two tile counts, two names: a conversation's `tiles_per_side` fixes its images' grid
(`SplitSettings.with_tiles_per_side`: 0 = unsplit, None = the checkpoint's full splitting), while
`max_reference_tiles` / `calibration_tiles` / `holdout_tiles` bound the tiles a whole set runs through
the reference tower. Neither is the board's `max_tiles`, a tile budget per image.
"""

from __future__ import annotations

import io
import json
import pickle
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import numpy as np

from board.bundle_schema import CALIBRATION_LAYOUTS
from board.image_io import load_image
from board.prompt import PromptFormat, build_prompt, render_chat
from board.sequence import build_sequence, stack_rows
from board.tiles import SplitSettings, TiledImage, split_image
from calibration.decoder_prompts import FOLLOW_UPS, QUESTIONS, SYSTEM, TEXT_ONLY
from calibration.holdout import load_holdout, write_holdout  # noqa: F401 (load_holdout: read through here too)

DATASET = "decoder_calibration.json"  # the input_embed layout
DATASET_META = "decoder_calibration.meta.json"
SAMPLE_LAYOUT = "decoder_calibration_samples"  # the samples layout: this folder + SAMPLE_LAYOUT.json, its index
HOLDOUT = "decoder_holdout.npz"
LAYOUTS = CALIBRATION_LAYOUTS  # the first is the default
DEFAULT_MAX_VALUES = 12_000_000
DEFAULT_CALIBRATION_TILES = 48
DEFAULT_HOLDOUT_TILES = 16
# text-only conversations: the first ones calibrate, the last ones are held out
HOLDOUT_TEXT = 3



def dataset_file(layout: str) -> str:
    """The file rkllm-toolkit's build(dataset=...) is given for a layout (relative to the calibration folder)."""
    if layout not in LAYOUTS:
        raise ValueError(f"calibration layout must be one of {LAYOUTS}, got {layout!r}")
    return f"{SAMPLE_LAYOUT}.json" if layout == "samples" else DATASET


Features = Callable[[np.ndarray], np.ndarray]  # uint8 NHWC tiles [n, T, T, 3] -> [n, N, hidden] float32
Progress = Callable[[str], None]


@dataclass(frozen=True)
class Conversation:
    """One calibration conversation: messages with image placeholders, and the images in order."""

    name: str
    messages: tuple[dict[str, Any], ...]
    images: tuple[Path, ...] = ()
    tiles_per_side: Optional[int] = 0  # the images' grid (SplitSettings.with_tiles_per_side); None: full splitting


@dataclass
class Sample:
    """A conversation turned into the decoder's input, as the board would build it."""

    name: str
    images: list[str]
    tiles: int
    input_ids: np.ndarray  # [n] int64
    image_positions: np.ndarray  # [tiles * image_seq_len] int64
    embeds: np.ndarray  # [n, hidden] float32
    text: str  # the rendered chat (one image token per image), for the record
    target: str = ""
    target_ids: list[int] = field(default_factory=list)

    @property
    def kind(self) -> str:
        return "image" if self.images else "text"

    @property
    def tokens(self) -> int:
        return int(self.input_ids.shape[0])


def _category(path: Path) -> str:
    prefix = path.stem.split("_", 1)[0]
    return prefix if prefix in QUESTIONS else "photo"


def _text(text: str) -> dict[str, str]:
    return {"type": "text", "text": text}


_IMAGE = {"type": "image"}


def image_conversation(path: Path, index: int, tiles_per_side: Optional[int]) -> Conversation:
    """One image with a question for its kind, in one of four shapes (image first, text first,
    with a system prompt, multi-turn), chosen by `index` so a set covers all of them."""
    questions = QUESTIONS[_category(path)]
    question = questions[index % len(questions)]
    shape = index % 4
    if shape == 0:
        messages = [{"role": "user", "content": [_IMAGE, _text(question)]}]
    elif shape == 1:
        messages = [{"role": "user", "content": [_text(question + "\n"), _IMAGE]}]
    elif shape == 2:
        messages = [
            {"role": "system", "content": [_text(SYSTEM[index % len(SYSTEM)])]},
            {"role": "user", "content": [_IMAGE, _text(question)]},
        ]
    else:
        answer, follow_up = FOLLOW_UPS[index % len(FOLLOW_UPS)]
        messages = [
            {"role": "user", "content": [_IMAGE, _text(question)]},
            {"role": "assistant", "content": [_text(" " + answer)]},
            {"role": "user", "content": [_text(follow_up)]},
        ]
    split = "full" if tiles_per_side is None else f"side{tiles_per_side}"
    return Conversation(f"{path.stem}-{split}-{shape}", tuple(messages), (path,), tiles_per_side)


def text_conversation(turns: Sequence[tuple[str, str]], index: int) -> Conversation:
    messages = tuple({"role": role, "content": [_text(text)]} for role, text in turns)
    return Conversation(f"text-{index}", messages)


def plan_conversations(
    images: Sequence[Path], text_turns: Sequence[Sequence[tuple[str, str]]], *,
    long_tiles_per_side: Sequence[Optional[int]] = (None, 2), question_offset: int = 0,
) -> list[Conversation]:
    """Long sequences first (one image per entry of `long_tiles_per_side`: None = the board's default
    full splitting), one two-image turn, then every image once as one unsplit tile interleaved with
    the text-only turns, so a budget cut keeps the long ones and drops a mix of the rest."""
    images = list(images)
    step = max(1, len(images) // max(1, len(long_tiles_per_side)))
    ordered = [
        image_conversation(images[(k * step) % len(images)], k + question_offset + 1, per_side)
        for k, per_side in enumerate(long_tiles_per_side) if images
    ]
    if len(images) >= 2:
        content = [_IMAGE, _text("and"), _IMAGE, _text("What differs between these two images?")]
        ordered.append(Conversation(f"{images[0].stem}+{images[1].stem}", ({"role": "user", "content": content},),
                                    (images[0], images[1]), 0))
    short = [image_conversation(p, i + question_offset, 0) for i, p in enumerate(images)]
    texts = [text_conversation(turns, i) for i, turns in enumerate(text_turns)]
    while short or texts:
        for queue in (short, texts):
            if queue:
                ordered.append(queue.pop(0))
    return ordered


class SequenceBuilder:
    """Conversations -> Samples with the board's splitting, prompt and embedding rules."""

    def __init__(self, *, fmt: PromptFormat, tokenizer: Any, image_token_id: int, settings: SplitSettings,
                 table: np.ndarray, features: Features):
        self.fmt, self.tokenizer, self.image_token_id = fmt, tokenizer, image_token_id
        self.settings, self.table, self.features = settings, table, features
        self._tiled: dict[tuple[Path, Optional[int]], TiledImage] = {}
        self._features: dict[tuple[Path, Optional[int]], np.ndarray] = {}

    @property
    def reference_tiles(self) -> int:
        """Tiles run through the vision tower so far (the budgeted cost; repeats are served from a cache)."""
        return sum(len(f) for f in self._features.values())

    def split(self, path: Path, tiles_per_side: Optional[int]) -> TiledImage:
        key = (path, tiles_per_side)
        if key not in self._tiled:
            self._tiled[key] = split_image(load_image(path), self.settings.with_tiles_per_side(tiles_per_side))
        return self._tiled[key]

    def plan(self, conv: Conversation) -> tuple[Any, int, int]:
        """(prompt, tokens, new reference tiles) without running the vision tower."""
        tiled = [self.split(p, conv.tiles_per_side) for p in conv.images]
        prompt = build_prompt(list(conv.messages), [t.plan for t in tiled], self.fmt, self.tokenizer, self.image_token_id)
        new = {(p, conv.tiles_per_side) for p in conv.images} - set(self._features)
        return prompt, len(prompt), sum(self.split(*key).plan.n_tiles for key in new)

    def build(self, conv: Conversation) -> Sample:
        prompt, _, _ = self.plan(conv)
        rows = []
        for path in conv.images:
            key = (path, conv.tiles_per_side)
            if key not in self._features:
                self._features[key] = np.asarray(self.features(self.split(*key).tiles), np.float32)
            rows.append(self._features[key])
        embeds = build_sequence(prompt, self.table, stack_rows(rows, self.table.shape[1]))
        return Sample(
            name=conv.name, images=[p.name for p in conv.images], tiles=sum(prompt.tiles_per_image),
            input_ids=prompt.input_ids, image_positions=prompt.image_positions, embeds=embeds,
            text=render_chat(list(conv.messages), self.fmt),
        )


def build_samples(conversations: Sequence[Conversation], builder: SequenceBuilder, *, max_reference_tiles: int,
                  max_tokens: int, progress: Optional[Progress] = None) -> list[Sample]:
    """Samples in plan order while they fit the budgets: tiles run through the reference tower (repeats
    come from its cache) and tokens; a sample that does not fit is skipped."""
    samples: list[Sample] = []
    tiles = tokens = 0
    for conv in conversations:
        _, n_tokens, new_tiles = builder.plan(conv)
        if tiles + new_tiles > max_reference_tiles or tokens + n_tokens > max_tokens:
            continue
        t0 = time.monotonic()
        samples.append(builder.build(conv))
        tiles, tokens = tiles + new_tiles, tokens + n_tokens
        if progress:
            progress(f"{len(samples)} samples, {tiles}/{max_reference_tiles} tiles, {tokens} tokens: {conv.name} "
                     f"({n_tokens} tokens, {time.monotonic() - t0:.1f}s)")
    if not samples:
        raise ValueError("no calibration sample fits the budget")
    return samples


def generate_targets(samples: Sequence[Sample], decoder: Any, tokenizer: Any, eos_ids: Sequence[int], *,
                     max_new_tokens: int = 32, progress: Optional[Progress] = None) -> None:
    """Fill each sample's target with the reference decoder's greedy answer (end-of-turn excluded).

    Runs on half the torch threads: one-token decode steps are too small to split, and when other
    work shares the cores, threads that wait on each other at every op made it 5x slower (measured
    on 2 busy cores: 32 tokens after 400 in 4 s on one thread, 23 s on two).
    """
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(max(1, threads // 2))
    try:
        _generate(samples, decoder, tokenizer, eos_ids, max_new_tokens, progress)
    finally:
        torch.set_num_threads(threads)


def greedy_ids(decoder: Any, embeds: np.ndarray, eos_ids: Sequence[int], max_new_tokens: int) -> list[int]:
    """The reference decoder's greedy continuation of an embedding sequence ([n, hidden]), its EOS id
    included when it ends the answer: calibration targets and the board doctor's reference ids."""
    import torch

    rows = torch.from_numpy(np.ascontiguousarray(embeds, np.float32))[None].to(decoder.dtype)
    with torch.no_grad():
        out = decoder.generate(
            inputs_embeds=rows, attention_mask=torch.ones(rows.shape[:2], dtype=torch.long),
            max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=list(eos_ids), pad_token_id=int(eos_ids[0]),
        )
    ids = [int(t) for t in out[0].tolist()]
    stop = next((i for i, t in enumerate(ids) if t in eos_ids), None)
    return ids if stop is None else ids[: stop + 1]


def _generate(samples: Sequence[Sample], decoder: Any, tokenizer: Any, eos_ids: Sequence[int], max_new_tokens: int,
              progress: Optional[Progress]) -> None:
    for i, sample in enumerate(samples):
        ids = greedy_ids(decoder, sample.embeds, eos_ids, max_new_tokens)
        while ids and ids[-1] in eos_ids:
            ids.pop()
        sample.target_ids = ids
        sample.target = tokenizer.decode(ids, skip_special_tokens=True)
        if progress:
            progress(f"target {i + 1}/{len(samples)}: {len(ids)} tokens")


# ---------------------------------------------------------------------------------------------
# Files
# ---------------------------------------------------------------------------------------------


def _rows_json(embeds: np.ndarray, digits: int) -> str:
    buffer = io.StringIO()
    np.savetxt(buffer, embeds, fmt=f"%.{digits}g", delimiter=",")
    return ",".join(f"[{line}]" for line in buffer.getvalue().splitlines())


def write_rkllm_dataset(samples: Sequence[Sample], path: str | Path, *, digits: int = 6) -> dict[str, Any]:
    """The rkllm-toolkit dataset: `[{"input_embed": [[row, ...]], "target": str}, ...]`, streamed to disk.

    `digits` significant digits per value: the fp16 table rows need 5 to be exact, and calibration
    only collects activation ranges.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write("[\n")
        for i, sample in enumerate(samples):
            f.write(",\n" if i else "")
            f.write('{"input_embed": [[' + _rows_json(sample.embeds, digits) + "]], ")
            f.write('"target": ' + json.dumps(sample.target, ensure_ascii=False) + "}")
        f.write("\n]\n")
    tmp.replace(path)
    return {"file": path.name, "bytes": path.stat().st_size, "samples": len(samples)}


def write_meta(samples: Sequence[Sample], path: str | Path, extra: dict[str, Any]) -> None:
    """What each sample is (conversation, images, tiles, tokens, target), next to the dataset."""
    rows = [
        {"name": s.name, "kind": s.kind, "images": s.images, "tiles": s.tiles, "tokens": s.tokens,
         "image_tokens": int(s.image_positions.size), "conversation": s.text, "target": s.target}
        for s in samples
    ]
    Path(path).write_text(json.dumps({**extra, "samples": rows}, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def write_sample_layout(samples: Sequence[Sample], folder: str | Path) -> dict[str, Any]:
    """Rockchip's 1.3.0 example layout: one pickle of forward kwargs per sample + an index json beside the
    folder (`[{"sample": "<folder>/sample_i", "token_nums": n}]`, paths relative to the index's folder)."""
    import torch

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    index = []
    for i, sample in enumerate(samples):
        n = sample.tokens
        kwargs = {
            "inputs_embeds": torch.from_numpy(sample.embeds)[None],
            "attention_mask": torch.ones(1, n, dtype=torch.long),
            "position_ids": torch.arange(n, dtype=torch.long)[None],
        }
        with open(folder / f"sample_{i}", "wb") as f:
            pickle.dump(kwargs, f)
        index.append({"sample": f"{folder.name}/sample_{i}", "token_nums": n})
    index_path = folder.parent / f"{folder.name}.json"
    index_path.write_text(json.dumps(index, indent=2) + "\n")
    size = index_path.stat().st_size + sum(p.stat().st_size for p in folder.iterdir())
    return {"file": index_path.name, "bytes": size, "samples": len(samples)}


def validate_rkllm_dataset(path: str | Path, hidden: int) -> dict[str, Any]:
    """Read a dataset back and check its layout: a list of entries with "target" and either "input"
    text or an "input_embed" of shape [1, n, hidden]. Returns counts; raises ValueError otherwise."""
    entries = json.loads(Path(path).read_text(encoding="utf-8"))
    if not isinstance(entries, list) or not entries:
        raise ValueError(f"{path}: not a non-empty JSON list")
    tokens = 0
    for i, entry in enumerate(entries):
        if not isinstance(entry, dict) or not isinstance(entry.get("target"), str):
            raise ValueError(f"{path}: entry {i} lacks a 'target' string")
        if "input_embed" in entry:
            shape = np.shape(entry["input_embed"])
            if len(shape) != 3 or shape[0] != 1 or shape[2] != hidden or shape[1] < 1:
                raise ValueError(f"{path}: entry {i} input_embed has shape {shape}, expected [1, n, {hidden}]")
            tokens += shape[1]
        elif not isinstance(entry.get("input"), str):
            raise ValueError(f"{path}: entry {i} has neither 'input_embed' nor 'input'")
    return {"samples": len(entries), "tokens": tokens}


# ---------------------------------------------------------------------------------------------
# The whole step
# ---------------------------------------------------------------------------------------------


def build_decoder_calibration(
    out_dir: str | Path,
    *,
    builder: SequenceBuilder,
    decoder: Any,
    tokenizer: Any,
    eos_ids: Sequence[int],
    images: Sequence[Path],
    holdout_images: Sequence[Path],
    calibration_tiles: int = DEFAULT_CALIBRATION_TILES,
    holdout_tiles: int = DEFAULT_HOLDOUT_TILES,
    max_values: int = DEFAULT_MAX_VALUES,
    max_new_tokens: int = 32,
    layout: str = LAYOUTS[0],
    progress: Optional[Progress] = None,
) -> dict[str, Any]:
    """Write the calibration set in `layout` (module docstring) with its meta, and the held-out samples,
    into out_dir; return a report with counts, sizes and timings. `calibration_tiles` and
    `holdout_tiles` are the reference tiles each set may spend."""
    dataset_file(layout)  # a bad layout is refused before anything long runs
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    hidden = int(builder.table.shape[1])
    max_tokens = max_values // hidden
    t0 = time.monotonic()
    calibration_plan = plan_conversations(images, TEXT_ONLY[:-HOLDOUT_TEXT])
    samples = build_samples(calibration_plan, builder, max_reference_tiles=calibration_tiles, max_tokens=max_tokens,
                            progress=progress)
    calibration_tiles = builder.reference_tiles
    holdout_plan = plan_conversations(holdout_images, TEXT_ONLY[-HOLDOUT_TEXT:], long_tiles_per_side=(2,),
                                      question_offset=2)
    holdout = build_samples(holdout_plan, builder, max_reference_tiles=holdout_tiles, max_tokens=max_tokens,
                            progress=progress)
    t_embed = time.monotonic() - t0
    generate_targets(samples, decoder, tokenizer, eos_ids, max_new_tokens=max_new_tokens, progress=progress)
    t_targets = time.monotonic() - t0 - t_embed
    for stale in (out / DATASET, out / f"{SAMPLE_LAYOUT}.json"):  # the other layout of an earlier run
        stale.unlink(missing_ok=True)
    if (out / SAMPLE_LAYOUT).is_dir():
        for old in (out / SAMPLE_LAYOUT).iterdir():
            old.unlink()
    if layout == "samples":
        written = write_sample_layout(samples, out / SAMPLE_LAYOUT)
    else:
        written = write_rkllm_dataset(samples, out / DATASET)
    report: dict[str, Any] = {
        "layout": layout,
        "dataset": written,
        "samples": len(samples),
        "image_samples": sum(s.kind == "image" for s in samples),
        "text_samples": sum(s.kind == "text" for s in samples),
        "tiles": sum(s.tiles for s in samples),
        "reference_tiles": calibration_tiles,
        "tokens": sum(s.tokens for s in samples),
        "max_sample_tokens": max(s.tokens for s in samples),
        "hidden_size": hidden,
        "budget": {"calibration_tiles": calibration_tiles, "max_values": max_values, "max_tokens": max_tokens},
        "holdout": {"file": HOLDOUT, "samples": len(holdout), "tiles": sum(s.tiles for s in holdout),
                    "reference_tiles": builder.reference_tiles - calibration_tiles,
                    "tokens": sum(s.tokens for s in holdout)},
        "seconds": {"embeddings": round(t_embed, 1), "targets": round(t_targets, 1)},
    }
    write_holdout(holdout, out / HOLDOUT)
    write_meta(samples, out / DATASET_META, {k: v for k, v in report.items() if k != "samples"})
    return report
