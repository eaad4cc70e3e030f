"""The bundle's schema: every file name and manifest key, once, with the rule its value follows.

Modelled on gguf-py's constants.py: the names live here; board/bundle.py reads a bundle with them
and host/bundle_writer.py writes one with them, so neither spells a key. A manifest key is a `Key`:
a str (index a manifest dict with it) that carries its `Rule`. Adding a key is one line in its
section class below; `validate()` checks it from then on and names its path in every refusal
(`manifest.files["vision.rknn"].sha256`).

manifest.json (format FORMAT_NAME, version FORMAT_VERSION) has the sections of `Manifest`: model,
target, toolkits, vision, decoder, embeddings, tokenizer, prompt_format (board.prompt.PromptFormat's
fields), preprocessor (the checkpoint's preprocessor_config.json as transformers writes it, read by
board.tiles.SplitSettings.from_preprocessor), generation, video (SmolVLM2 only), reference (what the
board doctor compares the runtimes with) and files (sha256 and size of every file, keyed by its path
inside the bundle). Keys a reader does not know are
ignored, so a section may grow within one format version: a key added that way is optional=True
(bundles written before it lack it); a new required key needs a new FORMAT_VERSION.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import PurePosixPath
from typing import Any, Optional

from .errors import BundleError

FORMAT_NAME = "smolvlm-rk3588-bundle"
FORMAT_VERSION = 1

# -- files ----------------------------------------------------------------------------------------
MANIFEST = "manifest.json"
VISION_RKNN = "vision.rknn"  # SigLIP tower + connector for rk3588 (uint8 NHWC tile in, [1, N, hidden] out)
DECODER_RKLLM = "decoder.rkllm"  # SmolLM2 decoder for librkllmrt (absent when converted with --skip-decoder)
EMBEDDINGS = "embed_tokens.npy"  # the text embedding table, float16 [vocab, hidden]
TOKENIZER = "tokenizer.json"  # the tokenizers library's format
HOST_DIR = "host"  # what only x86 emulation needs, and the conversion reports
VISION_ONNX = "host/vision.onnx"
DECODER_HF = "host/decoder"  # a folder: the standalone Llama-format text model
# opt-in (host.convert --vision-fallback): the fp16 vision model in Rockchip's own input layout (conv)
VISION_FALLBACK_RKNN = "vision_conv.rknn"
VISION_FALLBACK_ONNX = "host/vision_conv.onnx"
# the board doctor's reference data, from the full-precision model at conversion time (a board file)
REFERENCE = "reference.npz"
REFERENCE_TILE = "tile"  # its arrays: one uint8 [T, T, 3] tile ...
REFERENCE_ROWS = "rows"  # ... and that tile's float32 [tokens_per_tile, hidden] vision rows
# the decoder calibration set's layouts (calibration.decoder_dataset writes them, host.convert chooses)
CALIBRATION_LAYOUTS = ("samples", "input_embed")

REBUILD_HINT = "re-create it with `python -m host.convert --model <checkpoint> --out <dir>` on the host"


# -- rules ----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Rule:
    """What a value must be. kind: str, int, float (any number), bool, list, dict, or object (anything)."""

    kind: type = object
    optional: bool = False  # may be absent
    nullable: bool = False  # may be null
    minimum: Optional[int] = None  # numbers
    table: Optional[type] = None  # a dict whose keys are this section class's Keys
    each: Optional["Rule"] = None  # every item of a list; every value of a dict keyed by name (files)
    path: bool = False  # a str: a path inside the bundle; a dict: its keys are such paths


class Key(str):
    """A manifest key: the string itself, and `rule`, what its value must be."""

    rule: Rule

    def __new__(cls, name: str, kind: type = object, **rule: Any) -> "Key":
        key = super().__new__(cls, name)
        key.rule = Rule(kind, **rule)
        return key


def keys(section: type) -> list[Key]:
    """The Keys a section class declares, in declaration order."""
    return [v for v in vars(section).values() if isinstance(v, Key)]


# -- sections (a class per manifest table; its Keys are the table's keys) --------------------------
class Model:
    ID = Key("id", str)
    REVISION = Key("revision", str, optional=True, nullable=True)
    MODEL_TYPE = Key("model_type", str, optional=True)
    FAMILY = Key("family", str, optional=True, nullable=True)
    TINY = Key("tiny", bool, optional=True)  # random weights: the answers are noise
    NOTE = Key("note", str, optional=True, nullable=True)


class Target:
    """What the bundle runs on: checked against this software (bundle.py) and against the board."""

    PLATFORM = Key("platform", str)
    NPU_DRIVER_MIN = Key("npu_driver_min", str)  # "0.9.8"
    LIBRKLLMRT = Key("librkllmrt", str)  # the ABI decoder.rkllm is built for


class Toolkits:
    """Versions of what shaped the bundle (null: not installed), for diagnosis."""

    SMOLVLM_RK3588 = Key("smolvlm-rk3588", str, optional=True, nullable=True)
    RKNN_TOOLKIT2 = Key("rknn-toolkit2", str, optional=True, nullable=True)
    RKLLM_TOOLKIT = Key("rkllm-toolkit", str, optional=True, nullable=True)
    TRANSFORMERS = Key("transformers", str, optional=True, nullable=True)
    TORCH = Key("torch", str, optional=True, nullable=True)
    ONNX = Key("onnx", str, optional=True, nullable=True)
    PYTHON = Key("python", str, optional=True, nullable=True)


_DIMS = Rule(int, minimum=1)


class VisionInput:
    SHAPE = Key("shape", list, each=_DIMS)
    DTYPE = Key("dtype", str)
    FORMAT = Key("format", str)
    COLOR = Key("color", str)


class VisionAccuracy:
    """The rknn-toolkit2 simulator against PyTorch on held-out tiles."""

    COSINE_MIN = Key("cosine_min", float)
    COSINE_MEAN = Key("cosine_mean", float)
    THRESHOLD = Key("threshold", float)
    TILES = Key("tiles", int, minimum=0)


class VisionFallback:
    """The opt-in second vision model (board.vision.vision_model chooses between the two)."""

    FILE = Key("file", str, path=True)
    ONNX = Key("onnx", str, path=True, optional=True)
    DTYPE = Key("dtype", str)
    LAYOUT = Key("layout", str)
    ACCURACY = Key("accuracy", dict, table=VisionAccuracy, optional=True)


class Vision:
    FILE = Key("file", str, path=True)
    ONNX = Key("onnx", str, path=True, optional=True)
    DTYPE = Key("dtype", str)
    LAYOUT = Key("layout", str, optional=True)  # how a tile enters the model (board.vision.tile_feed)
    TILE = Key("tile", int, minimum=1)
    TOKENS_PER_TILE = Key("tokens_per_tile", int, minimum=1)
    PATCH = Key("patch", int, minimum=1, optional=True)  # with SCALE_FACTOR: what tokens_per_tile derives from
    SCALE_FACTOR = Key("scale_factor", int, minimum=1, optional=True)
    INPUT = Key("input", dict, table=VisionInput, optional=True)
    OUTPUT_SHAPE = Key("output_shape", list, each=_DIMS, optional=True)
    TARGET_PLATFORM = Key("target_platform", str, optional=True)
    QUANTIZATION = Key("quantization", dict, optional=True, nullable=True)
    ACCURACY = Key("accuracy", dict, table=VisionAccuracy, optional=True)
    EST_CYCLES_PER_TILE = Key("est_cycles_per_tile", float, optional=True, nullable=True)
    FALLBACK = Key("fallback", dict, table=VisionFallback, optional=True, nullable=True)


class Decoder:
    FILE = Key("file", str, path=True, optional=True, nullable=True)  # null: converted with --skip-decoder
    HF_FOLDER = Key("hf_folder", str, path=True, optional=True)
    HIDDEN_SIZE = Key("hidden_size", int, minimum=1)
    VOCAB_SIZE = Key("vocab_size", int, minimum=1, optional=True)
    NUM_HIDDEN_LAYERS = Key("num_hidden_layers", int, minimum=1, optional=True)
    MAX_CONTEXT = Key("max_context", int, minimum=1)
    MAX_POSITION_EMBEDDINGS = Key("max_position_embeddings", int, minimum=1, optional=True)
    TOOLKIT = Key("toolkit", optional=True, nullable=True)
    QUANTIZED_DTYPE = Key("quantized_dtype", str, optional=True)
    QUANTIZED_ALGORITHM = Key("quantized_algorithm", str, optional=True)
    TARGET_PLATFORM = Key("target_platform", str, optional=True)
    NUM_NPU_CORE = Key("num_npu_core", int, minimum=1, optional=True)
    OPTIMIZATION_LEVEL = Key("optimization_level", int, minimum=0, optional=True)  # rkllm-toolkit build()
    CALIBRATION = Key("calibration", dict, optional=True)  # layout and what the toolkit was seen to read
    ACCURACY = Key("accuracy", dict, optional=True)
    MISSING = Key("missing", str, optional=True)  # why there is no decoder.rkllm
    EMBED_FLASH = Key("embed_flash", bool, optional=True)  # the runtime's default RKLLMExtendParam.embed_flash


class Embeddings:
    FILE = Key("file", str, path=True)
    DTYPE = Key("dtype", str)
    SHAPE = Key("shape", list, each=_DIMS)  # [vocab, hidden]


class SpecialToken:
    TEXT = Key("text", str)
    ID = Key("id", int, minimum=0, nullable=True)


_TOKEN = dict(table=SpecialToken, optional=True, nullable=True)


class SpecialTokens:
    """The tokenizer's special tokens by role (null: this tokenizer has none for the role)."""

    BOS = Key("bos", dict, **_TOKEN)
    EOS = Key("eos", dict, **_TOKEN)
    PAD = Key("pad", dict, **_TOKEN)
    UNK = Key("unk", dict, **_TOKEN)
    IMAGE = Key("image", dict, **_TOKEN)
    FAKE_IMAGE = Key("fake_image", dict, **_TOKEN)
    GLOBAL_IMAGE = Key("global_image", dict, **_TOKEN)


class Tokenizer:
    FILE = Key("file", str, path=True)
    IMAGE_TOKEN_ID = Key("image_token_id", int, minimum=0)
    VOCAB_SIZE = Key("vocab_size", int, minimum=1, optional=True)
    SPECIAL_TOKENS = Key("special_tokens", dict, table=SpecialTokens, optional=True)


class Prompt:
    """board.prompt.PromptFormat's fields (PromptFormat.to_dict writes them; a test keeps the two equal)."""

    BOS = Key("bos", str)
    ROLES = Key("roles", dict, each=Rule(list, each=Rule(str)))  # role -> [text-first prefix, image-first prefix]
    END_OF_TURN = Key("end_of_turn", str)
    GENERATION_PROMPT = Key("generation_prompt", str)
    IMAGE_TOKEN = Key("image_token", str)
    FAKE_IMAGE_TOKEN = Key("fake_image_token", str)
    GLOBAL_IMAGE_TOKEN = Key("global_image_token", str)
    ROW_COL_TOKEN = Key("row_col_token", str)
    IMAGE_SEQ_LEN = Key("image_seq_len", int, minimum=1)


class Generation:
    EOS_TOKEN_IDS = Key("eos_token_ids", list, each=Rule(int, minimum=0))  # the end-of-turn id first
    END_OF_TURN_TOKEN = Key("end_of_turn_token", str, optional=True, nullable=True)
    BOS_TOKEN_ID = Key("bos_token_id", int, minimum=0, optional=True, nullable=True)
    PAD_TOKEN_ID = Key("pad_token_id", int, minimum=0, optional=True, nullable=True)


class VideoSize:
    LONGEST_EDGE = Key("longest_edge", int, minimum=1)


class Video:
    """SmolVLM2's video sampling (the checkpoint's video_sampling) and the reference's prompt pieces."""

    FPS = Key("fps", float)
    MAX_FRAMES = Key("max_frames", int)
    VIDEO_SIZE = Key("video_size", dict, table=VideoSize)
    INTRO = Key("intro", str)  # with {frame_count} and {video_duration}
    FRAME_TIMESTAMP = Key("frame_timestamp", str)  # with {timestamp}
    OUTRO = Key("outro", str)
    SKIP_SECS = Key("skip_secs", float, optional=True)


class ReferencePrompt:
    """One prompt of the reference: its messages (an image item is the reference tile, unsplit) and the
    full-precision decoder's first greedy token ids on it."""

    NAME = Key("name", str)
    MESSAGES = Key("messages", list, each=Rule(dict))
    GREEDY_IDS = Key("greedy_ids", list, each=Rule(int, minimum=0))
    STOPPED = Key("stopped", bool)  # the ids end with an EOS id (the model ended the answer)


_PROMPT = Rule(dict, table=ReferencePrompt)


class Reference:
    """What the board doctor (board/doctor.py) compares the runtimes with."""

    FILE = Key("file", str, path=True)  # REFERENCE: the tile and its vision rows
    SOURCE = Key("source", str)  # the image the tile was cut from
    NEW_TOKENS = Key("new_tokens", int, minimum=1)  # greedy tokens generated per prompt
    PROMPTS = Key("prompts", list, each=_PROMPT)  # a text prompt and an image prompt
    EOS_PROMPT = Key("eos_prompt", dict, table=ReferencePrompt, nullable=True)  # one the model ends; null: none found
    EOS_SEARCH_TOKENS = Key("eos_search_tokens", int, minimum=1)


class FileEntry:
    SHA256 = Key("sha256", str)
    BYTES = Key("bytes", int, minimum=0)


class Manifest:
    """The top level of manifest.json."""

    FORMAT = Key("format", str)
    VERSION = Key("format_version", int)
    CREATED = Key("created", str, optional=True)
    MODEL = Key("model", dict, table=Model)
    TARGET = Key("target", dict, table=Target)
    TOOLKITS = Key("toolkits", dict, table=Toolkits, optional=True)
    VISION = Key("vision", dict, table=Vision)
    DECODER = Key("decoder", dict, table=Decoder)
    EMBEDDINGS = Key("embeddings", dict, table=Embeddings)
    TOKENIZER = Key("tokenizer", dict, table=Tokenizer)
    PROMPT = Key("prompt_format", dict, table=Prompt)
    PREPROCESSOR = Key("preprocessor", dict)
    GENERATION = Key("generation", dict, table=Generation)
    VIDEO = Key("video", dict, table=Video, optional=True)
    REFERENCE = Key("reference", dict, table=Reference, optional=True)
    FILES = Key("files", dict, each=Rule(dict, table=FileEntry), path=True)


# -- checking ---------------------------------------------------------------------------------------
_KIND_NAMES = {str: "a string", int: "an integer", float: "a number", bool: "true or false", list: "a list",
               dict: "a table (JSON object)"}


def path_problem(rel: str) -> Optional[str]:
    """Why `rel` is not a path inside the bundle (None if it is). Symlinks are the reader's to resolve."""
    if not rel:
        return "is empty"
    if PurePosixPath(rel).is_absolute():
        return "is an absolute path"
    if ".." in PurePosixPath(rel).parts:
        return "leaves the bundle folder (..)"
    return None


def _shown(value: Any) -> str:
    text = json.dumps(value, default=str)
    return text if len(text) <= 60 else text[:57] + "..."


def _is_kind(value: Any, kind: type) -> bool:
    if kind is object:
        return True
    if kind in (int, float) and isinstance(value, bool):  # JSON true is not 1
        return False
    return isinstance(value, (int, float) if kind is float else kind)


def _refuse(message: str) -> BundleError:
    return BundleError(message, hint=REBUILD_HINT)


def check(value: Any, rule: Rule, where: str) -> None:
    """Refuse `value` (found at `where`, e.g. 'manifest.decoder') unless it follows `rule`."""
    if value is None:
        if rule.nullable:
            return
        raise _refuse(f"{where} is null; it must be {_KIND_NAMES.get(rule.kind, 'set')}")
    if not _is_kind(value, rule.kind):
        raise _refuse(f"{where} must be {_KIND_NAMES[rule.kind]}, not {_shown(value)}")
    if rule.minimum is not None and value < rule.minimum:
        raise _refuse(f"{where} is {_shown(value)}; it must be at least {rule.minimum}")
    if rule.path and isinstance(value, str) and (problem := path_problem(value)):
        raise _refuse(f"{where} = {_shown(value)} {problem}; every file must be inside the bundle")
    if rule.table is not None:
        validate(value, rule.table, where)
    if rule.each is not None and isinstance(value, list):
        for i, item in enumerate(value):
            check(item, rule.each, f"{where}[{i}]")
    elif rule.each is not None:
        for name, item in value.items():
            at = f"{where}[{json.dumps(name)}]"
            if rule.path and (problem := path_problem(name)):
                raise _refuse(f"{at}: the path {problem}; every file must be inside the bundle")
            check(item, rule.each, at)


def validate(table: Mapping[str, Any], section: type = Manifest, where: str = "manifest",
             only: Optional[Iterable[Key]] = None) -> None:
    """Refuse a table lacking a required key of `section` (or of `only`) or holding a value against its rule."""
    for key in keys(section) if only is None else only:
        if key not in table:
            if not key.rule.optional:
                raise _refuse(f"{where}.{key} is missing")
            continue
        check(table[key], key.rule, f"{where}.{key}")
