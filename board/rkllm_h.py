"""ctypes binding of Rockchip's `rkllm.h`, exactly as in rknn-llm release 1.3.0 (librkllmrt.so 1.3.0).

A 1:1 binding, laid out like the header (llama-cpp-python's `llama_cpp.py` is the model): the same
names for every enum, struct, union, callback typedef and function; each function is declared next
to its C prototype by `_c_function`, which records argtypes/restype. Only `decoder_rkllm` should
build on it; everything Pythonic lives there.

Why so strict: the runtime's ABI changed in 1.1, 1.2.0, 1.2.1 and 1.3.0, and nothing in the API
reports a version. Against 1.2.x, `rkllm_init` would take our `RKLLMCallback*` for a function
pointer and jump into it. So the struct sizes are asserted at import (LP64), and `load_library`
refuses a library that lacks a 1.2.1+ function or whose `rkllm_createDefaultParam` does not have
the 1.3.0 layout (see `_probe_default_param`).

The library is loaded lazily: this module imports on any machine without librkllmrt. Call
`load_library(search_dirs)` for an `RKLLMLibrary` (one loaded .so with every function bound); the
module-level functions call the first library loaded (loading it with the default search if needed).
"""

from __future__ import annotations

import ctypes
import enum
import functools
import os
import platform
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, List, Optional, Tuple, Union

from .errors import RuntimeUnavailable

RKLLM_VERSION = "1.3.0"
LIBRARY_NAME = "librkllmrt.so"
# Searched after RKLLM_LIB and the caller's folders (the bundle). Tests monkeypatch it.
SYSTEM_LIB_DIRS: Tuple[str, ...] = (
    "/usr/lib",
    "/usr/lib64",
    "/usr/local/lib",
    "/lib",
    "/usr/lib/aarch64-linux-gnu",
    "/lib/aarch64-linux-gnu",
)
LIB_ENV = "RKLLM_LIB"
# Escape hatch for the layout probe, which relies on a documented default (see _probe_default_param).
SKIP_LAYOUT_CHECK_ENV = "RKLLM_SKIP_LAYOUT_CHECK"

INSTALL_HINT = (
    f"get librkllmrt.so {RKLLM_VERSION} from Rockchip's GitHub release airockchip/rknn-llm "
    f"release-v{RKLLM_VERSION} (file rkllm-runtime/Linux/librkllm_api/aarch64/librkllmrt.so) and copy it "
    f"to /usr/lib/ on the board, or into the bundle folder, or set {LIB_ENV}=/path/to/librkllmrt.so"
)

# ---------------------------------------------------------------------------------------------
# Macros: CPU bits for RKLLMExtendParam.enabled_cpus_mask (CPU4..CPU7 are the RK3588's A76 cores).
CPU0 = 1 << 0
CPU1 = 1 << 1
CPU2 = 1 << 2
CPU3 = 1 << 3
CPU4 = 1 << 4
CPU5 = 1 << 5
CPU6 = 1 << 6
CPU7 = 1 << 7

# typedef void* LLMHandle;
LLMHandle = ctypes.c_void_p


# ---------------------------------------------------------------------------------------------
# Enums. C enums are `int` on the ABIs we target, so enum-typed fields are ctypes.c_int.


class LLMCallState(enum.IntEnum):
    """State passed to the result callback. 1.3.0 has no RKLLM_RUN_GET_LAST_HIDDEN_LAYER (1.1.x had 4)."""

    RKLLM_RUN_NORMAL = 0
    RKLLM_RUN_WAITING = 1  # the decoded bytes are not yet a complete UTF-8 character
    RKLLM_RUN_FINISH = 2
    RKLLM_RUN_ERROR = 3


class RKLLMInputType(enum.IntEnum):
    """Which member of RKLLMInput's union is set."""

    RKLLM_INPUT_PROMPT = 0
    RKLLM_INPUT_TOKEN = 1
    RKLLM_INPUT_EMBED = 2
    RKLLM_INPUT_MULTIMODAL = 3


class RKLLMInferMode(enum.IntEnum):
    """What rkllm_run produces: text, or the last hidden layer / logits through the callback."""

    RKLLM_INFER_GENERATE = 0
    RKLLM_INFER_GET_LAST_HIDDEN_LAYER = 1
    RKLLM_INFER_GET_LOGITS = 2


# ---------------------------------------------------------------------------------------------
# Callback typedefs that the structs need.

# typedef int (*LLMGetEmbedCallback)(void* userdata, int32_t* tokens, uint64_t num_tokens,
#                                    void* embed, uint64_t len);
LLMGetEmbedCallback = ctypes.CFUNCTYPE(
    ctypes.c_int, ctypes.c_void_p, ctypes.POINTER(ctypes.c_int32), ctypes.c_uint64, ctypes.c_void_p, ctypes.c_uint64
)

# typedef int (*LLMTokenizerCallback)(void* userdata, const char* text, int32_t text_len,
#                                     int32_t* tokens, int32_t n_tokens_max);
# `text` is POINTER(c_char), not c_char_p: it comes with a length and need not end in NUL.
LLMTokenizerCallback = ctypes.CFUNCTYPE(
    ctypes.c_int,
    ctypes.c_void_p,
    ctypes.POINTER(ctypes.c_char),
    ctypes.c_int32,
    ctypes.POINTER(ctypes.c_int32),
    ctypes.c_int32,
)


# ---------------------------------------------------------------------------------------------
# Structs and unions, in header order.


class RKLLMExtendParam(ctypes.Structure):
    """Init-time extras: NPU memory domain, CPU cores for the CPU-side ops, batch size."""

    _fields_ = [
        ("base_domain_id", ctypes.c_int32),
        ("embed_flash", ctypes.c_int8),  # 1: look word embeddings up from flash, saving RAM
        ("enabled_cpus_num", ctypes.c_int8),
        ("enabled_cpus_mask", ctypes.c_uint32),  # CPU0..CPU7 bits
        ("n_batch", ctypes.c_uint8),  # documented default 1
        ("use_cross_attn", ctypes.c_int8),
        ("reserved", ctypes.c_uint8 * 104),
    ]


class RKLLMParam(ctypes.Structure):
    """Init parameters; start from rkllm_createDefaultParam() and override. 1.3.0 moved img_start/
    img_end/img_content out (into RKLLMMultiModalInput) and added ignore_eos_token."""

    _fields_ = [
        ("model_path", ctypes.c_char_p),
        ("max_context_len", ctypes.c_int32),
        ("max_new_tokens", ctypes.c_int32),
        ("top_k", ctypes.c_int32),
        ("n_keep", ctypes.c_int32),  # KV entries kept at the start when the context window shifts
        ("top_p", ctypes.c_float),
        ("temperature", ctypes.c_float),
        ("repeat_penalty", ctypes.c_float),
        ("frequency_penalty", ctypes.c_float),
        ("presence_penalty", ctypes.c_float),
        ("mirostat", ctypes.c_int32),
        ("mirostat_tau", ctypes.c_float),
        ("mirostat_eta", ctypes.c_float),
        ("skip_special_token", ctypes.c_bool),
        ("ignore_eos_token", ctypes.c_bool),
        ("is_async", ctypes.c_bool),
        ("extend_param", RKLLMExtendParam),
    ]


class RKLLMLoraAdapter(ctypes.Structure):
    """A LoRA adapter file to load with rkllm_load_lora."""

    _fields_ = [
        ("lora_adapter_path", ctypes.c_char_p),
        ("lora_adapter_name", ctypes.c_char_p),
        ("scale", ctypes.c_float),
    ]


class RKLLMEmbedInput(ctypes.Structure):
    """EMBED input: n_tokens rows of float32 embeddings (the model's hidden size each), row-major."""

    _fields_ = [
        ("embed", ctypes.POINTER(ctypes.c_float)),
        ("n_tokens", ctypes.c_size_t),
    ]


class RKLLMTokenInput(ctypes.Structure):
    """TOKEN input: token ids."""

    _fields_ = [
        ("input_ids", ctypes.POINTER(ctypes.c_int32)),
        ("n_tokens", ctypes.c_size_t),
    ]


class RKLLMMultiModalInputImage(ctypes.Structure):
    """The `image` member of RKLLMMultiModalInput (an anonymous struct in C, named here)."""

    _fields_ = [
        ("image_embed", ctypes.POINTER(ctypes.c_float)),
        ("n_image_tokens", ctypes.c_size_t),
        ("n_image", ctypes.c_size_t),
        ("image_start", ctypes.c_char_p),
        ("image_end", ctypes.c_char_p),
        ("image_content", ctypes.c_char_p),
        ("image_width", ctypes.c_size_t),
        ("image_height", ctypes.c_size_t),
    ]


class RKLLMMultiModalInputVideo(ctypes.Structure):
    """The `video` member of RKLLMMultiModalInput (an anonymous struct in C, named here)."""

    _fields_ = [
        ("video_embed", ctypes.POINTER(ctypes.c_float)),
        ("n_frame_tokens", ctypes.c_size_t),
        ("n_frame_per_video", ctypes.c_size_t),
        ("n_video", ctypes.c_size_t),
        ("video_start", ctypes.c_char_p),
        ("video_end", ctypes.c_char_p),
        ("video_content", ctypes.c_char_p),
        ("frame_width", ctypes.c_size_t),
        ("frame_height", ctypes.c_size_t),
    ]


class RKLLMMultiModalInput(ctypes.Structure):
    """MULTIMODAL input: a prompt with image/video placeholders the runtime expands (we use EMBED)."""

    _fields_ = [
        ("prompt", ctypes.c_char_p),
        ("image", RKLLMMultiModalInputImage),
        ("video", RKLLMMultiModalInputVideo),
    ]


class RKLLMInputUnion(ctypes.Union):
    """RKLLMInput's anonymous union (named here); its members read as RKLLMInput attributes."""

    _fields_ = [
        ("prompt_input", ctypes.c_char_p),
        ("embed_input", RKLLMEmbedInput),
        ("token_input", RKLLMTokenInput),
        ("multimodal_input", RKLLMMultiModalInput),
    ]


class RKLLMInput(ctypes.Structure):
    """One rkllm_run input; `input_type` says which union member is set. role: "user" or "tool"."""

    _anonymous_ = ("_u",)
    _fields_ = [
        ("role", ctypes.c_char_p),
        ("enable_thinking", ctypes.c_bool),  # Qwen3 thinking mode; applies to templated text input
        ("input_type", ctypes.c_int),  # RKLLMInputType
        ("_u", RKLLMInputUnion),
    ]


class RKLLMLoraParam(ctypes.Structure):
    """Which loaded LoRA adapter a run uses."""

    _fields_ = [("lora_adapter_name", ctypes.c_char_p)]


class RKLLMPromptCacheParam(ctypes.Structure):
    """Ask a run to save its prompt cache to a file."""

    _fields_ = [
        ("save_prompt_cache", ctypes.c_int),
        ("prompt_cache_path", ctypes.c_char_p),
    ]


class RKLLMCrossAttnParam(ctypes.Structure):
    """Encoder K/V caches, mask and positions for cross-attention decoders."""

    _fields_ = [
        ("encoder_k_cache", ctypes.POINTER(ctypes.c_float)),
        ("encoder_v_cache", ctypes.POINTER(ctypes.c_float)),
        ("encoder_mask", ctypes.POINTER(ctypes.c_float)),
        ("encoder_pos", ctypes.POINTER(ctypes.c_int32)),
        ("num_tokens", ctypes.c_int),
    ]


class RKLLMSamplingParam(ctypes.Structure):
    """Per-run sampling override (new in 1.3.0), pointed to by RKLLMInferParam.sampling_params."""

    _fields_ = [
        ("top_k", ctypes.c_int32),
        ("top_p", ctypes.c_float),
        ("temperature", ctypes.c_float),
        ("repeat_penalty", ctypes.c_float),
        ("frequency_penalty", ctypes.c_float),
        ("presence_penalty", ctypes.c_float),
        ("mirostat", ctypes.c_int32),
        ("mirostat_tau", ctypes.c_float),
        ("mirostat_eta", ctypes.c_float),
    ]


class RKLLMInferParam(ctypes.Structure):
    """Per-run settings. sampling_params and max_new_tokens (<= 0: the init value) are new in 1.3.0."""

    _fields_ = [
        ("mode", ctypes.c_int),  # RKLLMInferMode
        ("lora_params", ctypes.POINTER(RKLLMLoraParam)),
        ("prompt_cache_params", ctypes.POINTER(RKLLMPromptCacheParam)),
        ("sampling_params", ctypes.POINTER(RKLLMSamplingParam)),
        ("keep_history", ctypes.c_int),  # 1: keep this turn in the KV cache
        ("max_new_tokens", ctypes.c_int32),
    ]


class RKLLMResultLastHiddenLayer(ctypes.Structure):
    """Hidden states of the last layer (RKLLM_INFER_GET_LAST_HIDDEN_LAYER); valid during the callback."""

    _fields_ = [
        ("hidden_states", ctypes.POINTER(ctypes.c_float)),
        ("embd_size", ctypes.c_int),
        ("num_tokens", ctypes.c_int),
    ]


class RKLLMResultLogits(ctypes.Structure):
    """Logits (RKLLM_INFER_GET_LOGITS); valid during the callback."""

    _fields_ = [
        ("logits", ctypes.POINTER(ctypes.c_float)),
        ("vocab_size", ctypes.c_int),
        ("num_tokens", ctypes.c_int),
    ]


class RKLLMPerfStat(ctypes.Structure):
    """Timings and peak memory (VmHWM) of a run; filled on RKLLM_RUN_FINISH."""

    _fields_ = [
        ("prefill_time_ms", ctypes.c_float),
        ("prefill_tokens", ctypes.c_int),
        ("generate_time_ms", ctypes.c_float),
        ("generate_tokens", ctypes.c_int),
        ("memory_usage_mb", ctypes.c_float),
    ]


class RKLLMResult(ctypes.Structure):
    """What the result callback receives; owned by the runtime and valid only during the call.
    `perf` is a struct held by value (the header's comment calls it a pointer; it is not)."""

    _fields_ = [
        ("text", ctypes.c_char_p),
        ("token_id", ctypes.c_int32),
        ("last_hidden_layer", RKLLMResultLastHiddenLayer),
        ("logits", RKLLMResultLogits),
        ("perf", RKLLMPerfStat),
    ]


# typedef int (*LLMResultCallback)(RKLLMResult* result, void* userdata, LLMCallState state);
# Return 0 to continue, 1 to pause (a later rkllm_run resumes); the header also documents 2
# (release the current output buffer, for the hidden-layer/logits modes).
LLMResultCallback = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.POINTER(RKLLMResult), ctypes.c_void_p, ctypes.c_int)


class RKLLMCallback(ctypes.Structure):
    """Callbacks given to rkllm_init (1.3.0; before, rkllm_init took the result callback itself).
    The tokenizer/embed callbacks are optional (models without an internal tokenizer/embedding)."""

    _fields_ = [
        ("result_callback", LLMResultCallback),
        ("result_userdata", ctypes.c_void_p),
        ("tokenizer_callback", LLMTokenizerCallback),
        ("tokenizer_userdata", ctypes.c_void_p),
        ("embed_callback", LLMGetEmbedCallback),
        ("embed_userdata", ctypes.c_void_p),
    ]


# ---------------------------------------------------------------------------------------------
# Layout check (LP64: aarch64 and x86_64 Linux). A wrong size here means a wrong declaration above.

LP64_SIZES: Dict[type, int] = {
    RKLLMExtendParam: 120,
    RKLLMParam: 184,
    RKLLMLoraAdapter: 24,
    RKLLMEmbedInput: 16,
    RKLLMTokenInput: 16,
    RKLLMMultiModalInputImage: 64,
    RKLLMMultiModalInputVideo: 72,
    RKLLMMultiModalInput: 144,
    RKLLMInputUnion: 144,
    RKLLMInput: 160,
    RKLLMLoraParam: 8,
    RKLLMPromptCacheParam: 16,
    RKLLMCrossAttnParam: 40,
    RKLLMSamplingParam: 36,
    RKLLMInferParam: 40,
    RKLLMResultLastHiddenLayer: 16,
    RKLLMResultLogits: 16,
    RKLLMPerfStat: 20,
    RKLLMResult: 72,
    RKLLMCallback: 48,
}
IS_LP64 = ctypes.sizeof(ctypes.c_void_p) == 8 and ctypes.sizeof(ctypes.c_long) == 8


def _check_lp64_sizes() -> None:
    if not IS_LP64:  # 32-bit userland: load_library refuses it, sizes would differ anyway
        return
    wrong = {t.__name__: (ctypes.sizeof(t), n) for t, n in LP64_SIZES.items() if ctypes.sizeof(t) != n}
    if wrong:
        raise ImportError(f"rkllm_h: struct sizes differ from the librkllmrt {RKLLM_VERSION} ABI (got, want): {wrong}")


_check_lp64_sizes()


# ---------------------------------------------------------------------------------------------
# Function declarations. `_c_function` records argtypes/restype for RKLLMLibrary to apply and
# returns a stub that calls the first loaded library.

_FUNCTIONS: Dict[str, Tuple[List[Any], Any]] = {}


def _c_function(argtypes: List[Any], restype: Any) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    def decorator(stub: Callable[..., Any]) -> Callable[..., Any]:
        name = stub.__name__
        _FUNCTIONS[name] = (argtypes, restype)

        @functools.wraps(stub)
        def call(*args: Any) -> Any:
            return getattr(default_library(), name)(*args)

        return call

    return decorator


# RKLLMParam rkllm_createDefaultParam();
@_c_function([], RKLLMParam)
def rkllm_createDefaultParam() -> RKLLMParam:
    """The runtime's default parameters (RKLLMLibrary reads them through an oversized buffer)."""
    ...


# int rkllm_init(LLMHandle* handle, RKLLMParam* param, RKLLMCallback* callback);
@_c_function([ctypes.POINTER(LLMHandle), ctypes.POINTER(RKLLMParam), ctypes.POINTER(RKLLMCallback)], ctypes.c_int)
def rkllm_init(
    handle: "ctypes._Pointer[LLMHandle]",
    param: "ctypes._Pointer[RKLLMParam]",
    callback: "ctypes._Pointer[RKLLMCallback]",
) -> int:
    """Load param.model_path and fill *handle; 0 on success. Keep `callback` alive until rkllm_destroy."""
    ...


# int rkllm_load_lora(LLMHandle handle, RKLLMLoraAdapter* lora_adapter);
@_c_function([LLMHandle, ctypes.POINTER(RKLLMLoraAdapter)], ctypes.c_int)
def rkllm_load_lora(handle: LLMHandle, lora_adapter: "ctypes._Pointer[RKLLMLoraAdapter]") -> int:
    """Load one LoRA adapter; 0 on success."""
    ...


# int rkllm_load_prompt_cache(LLMHandle handle, const char* prompt_cache_path);
@_c_function([LLMHandle, ctypes.c_char_p], ctypes.c_int)
def rkllm_load_prompt_cache(handle: LLMHandle, prompt_cache_path: bytes) -> int:
    """Load a prompt cache saved by an earlier run; 0 on success."""
    ...


# int rkllm_release_prompt_cache(LLMHandle handle);
@_c_function([LLMHandle], ctypes.c_int)
def rkllm_release_prompt_cache(handle: LLMHandle) -> int:
    """Drop the loaded prompt cache; 0 on success."""
    ...


# int rkllm_destroy(LLMHandle handle);
@_c_function([LLMHandle], ctypes.c_int)
def rkllm_destroy(handle: LLMHandle) -> int:
    """Free the model and its NPU memory; 0 on success. The handle is invalid afterwards."""
    ...


# int rkllm_run(LLMHandle handle, RKLLMInput* rkllm_input, RKLLMInferParam* rkllm_infer_params,
#               void* userdata);
@_c_function([LLMHandle, ctypes.POINTER(RKLLMInput), ctypes.POINTER(RKLLMInferParam), ctypes.c_void_p], ctypes.c_int)
def rkllm_run(
    handle: LLMHandle,
    rkllm_input: "ctypes._Pointer[RKLLMInput]",
    rkllm_infer_params: "ctypes._Pointer[RKLLMInferParam]",
    userdata: Optional[int],
) -> int:
    """Run synchronously, calling the result callback per token; userdata (if not NULL) overrides result_userdata."""
    ...


# int rkllm_run_async(LLMHandle handle, RKLLMInput* rkllm_input, RKLLMInferParam* rkllm_infer_params,
#                     void* userdata);
@_c_function([LLMHandle, ctypes.POINTER(RKLLMInput), ctypes.POINTER(RKLLMInferParam), ctypes.c_void_p], ctypes.c_int)
def rkllm_run_async(
    handle: LLMHandle,
    rkllm_input: "ctypes._Pointer[RKLLMInput]",
    rkllm_infer_params: "ctypes._Pointer[RKLLMInferParam]",
    userdata: Optional[int],
) -> int:
    """Start a run and return at once; results arrive through the callback."""
    ...


# int rkllm_abort(LLMHandle handle);
@_c_function([LLMHandle], ctypes.c_int)
def rkllm_abort(handle: LLMHandle) -> int:
    """Ask the running task to stop; 0 on success."""
    ...


# int rkllm_is_running(LLMHandle handle);
@_c_function([LLMHandle], ctypes.c_int)
def rkllm_is_running(handle: LLMHandle) -> int:
    """1 while a task runs (1.3.0 wording; 1.2.0 documented the opposite sense)."""
    ...


# int rkllm_clear_kv_cache(LLMHandle handle, int keep_system_prompt, int* start_pos, int* end_pos);
@_c_function([LLMHandle, ctypes.c_int, ctypes.POINTER(ctypes.c_int), ctypes.POINTER(ctypes.c_int)], ctypes.c_int)
def rkllm_clear_kv_cache(
    handle: LLMHandle,
    keep_system_prompt: int,
    start_pos: "Optional[ctypes._Pointer[ctypes.c_int]]",
    end_pos: "Optional[ctypes._Pointer[ctypes.c_int]]",
) -> int:
    """Clear the KV cache: all of it with NULL ranges, or [start_pos, end_pos) per batch; 0 on success."""
    ...


# int rkllm_get_kv_cache_size(LLMHandle handle, int* cache_sizes);
@_c_function([LLMHandle, ctypes.POINTER(ctypes.c_int)], ctypes.c_int)
def rkllm_get_kv_cache_size(handle: LLMHandle, cache_sizes: "ctypes._Pointer[ctypes.c_int]") -> int:
    """Write the number of cached positions per batch (n_batch ints) to cache_sizes; 0 on success."""
    ...


# int rkllm_set_chat_template(LLMHandle handle, const char* system_prompt, const char* prompt_prefix,
#                             const char* prompt_postfix);
@_c_function([LLMHandle, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p], ctypes.c_int)
def rkllm_set_chat_template(
    handle: LLMHandle, system_prompt: bytes, prompt_prefix: bytes, prompt_postfix: bytes
) -> int:
    """Replace the template the runtime wraps around text input (not applied to EMBED input)."""
    ...


# int rkllm_set_function_tools(LLMHandle handle, const char* system_prompt, const char* tools,
#                              const char* tool_response_str);
@_c_function([LLMHandle, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p], ctypes.c_int)
def rkllm_set_function_tools(
    handle: LLMHandle, system_prompt: bytes, tools: bytes, tool_response_str: bytes
) -> int:
    """Configure function calling (tools as a JSON string); 0 on success."""
    ...


# int rkllm_set_cross_attn_params(LLMHandle handle, RKLLMCrossAttnParam* cross_attn_params);
@_c_function([LLMHandle, ctypes.POINTER(RKLLMCrossAttnParam)], ctypes.c_int)
def rkllm_set_cross_attn_params(
    handle: LLMHandle, cross_attn_params: "ctypes._Pointer[RKLLMCrossAttnParam]"
) -> int:
    """Give a cross-attention decoder its encoder caches; 0 on success."""
    ...


# ---------------------------------------------------------------------------------------------
# Version fingerprints: functions by the release that introduced them (checked against the
# headers of every tag in airockchip/rknn-llm). 1.2.1 through 1.3.0 export the same 15 functions,
# so symbols alone cannot tell 1.2.x from 1.3.0; the default-param probe does that.
_CORE_FUNCTIONS = ("rkllm_createDefaultParam", "rkllm_init", "rkllm_run", "rkllm_destroy")
_SINCE_1_2_0 = ("rkllm_clear_kv_cache", "rkllm_set_chat_template")
_SINCE_1_2_1 = ("rkllm_get_kv_cache_size", "rkllm_set_function_tools", "rkllm_set_cross_attn_params")

# rkllm_createDefaultParam returns RKLLMParam by value: larger than 16 bytes, so on AAPCS64 and
# x86-64 SysV alike the caller passes a buffer and the callee writes its own sizeof(RKLLMParam)
# bytes into it. A 1.2.x library writes 208 bytes (three more pointers); declaring the return as
# this oversized struct keeps that write inside memory we own.
_DEFAULT_PARAM_SPARE = 256


class _RKLLMParamReturnBuffer(ctypes.Structure):
    _fields_ = [("param", RKLLMParam), ("spare", ctypes.c_uint8 * _DEFAULT_PARAM_SPARE)]


# Where a 1.2.1-1.2.3 RKLLMParam (208 bytes: img_start/img_end/img_content before extend_param at
# offset 88) keeps extend_param.n_batch.
_OLD_LAYOUT_N_BATCH_OFFSET = 100


def _probe_default_param(raw: bytes) -> Optional[str]:
    """Why these default-param bytes are not a 1.3.0 RKLLMParam, or None if they look right.

    The tell is extend_param.n_batch, documented (header and SDK manual) to default to 1: at its
    1.3.0 offset (72) a 1.2.x library has the img_end pointer instead. The bool fields must be 0/1.
    """
    param = RKLLMParam.from_buffer_copy(raw)
    bools = raw[RKLLMParam.skip_special_token.offset : RKLLMParam.is_async.offset + 1]
    if param.extend_param.n_batch == 1 and all(b in (0, 1) for b in bools):
        return None
    if raw[_OLD_LAYOUT_N_BATCH_OFFSET] == 1:
        return "its rkllm_createDefaultParam() returns the 1.2.1-1.2.3 layout (a 208-byte RKLLMParam)"
    return (
        f"its rkllm_createDefaultParam() does not return the {RKLLM_VERSION} layout "
        f"(extend_param.n_batch = {param.extend_param.n_batch}, expected the documented default 1)"
    )


class RKLLMLibrary:
    """One loaded librkllmrt with every declared function bound (argtypes/restype set).

    Owners of an LLMHandle keep a reference to the library that made it, so it stays loaded.
    """

    def __init__(self, cdll: ctypes.CDLL, path: Path):
        self.path = path
        self._cdll = cdll
        for name, (argtypes, restype) in _FUNCTIONS.items():
            fn = getattr(cdll, name)
            fn.argtypes = argtypes
            fn.restype = restype
            if name == "rkllm_createDefaultParam":
                fn.restype = _RKLLMParamReturnBuffer  # unwrapped by the method below
                self._create_default_param = fn
            else:
                setattr(self, name, fn)

    def default_param_bytes(self) -> bytes:
        """rkllm_createDefaultParam()'s result as raw bytes, with spare room for an older layout."""
        return bytes(self._create_default_param())

    def rkllm_createDefaultParam(self) -> RKLLMParam:
        """RKLLMParam rkllm_createDefaultParam();"""
        return RKLLMParam.from_buffer_copy(self.default_param_bytes())

    def __repr__(self) -> str:
        return f"RKLLMLibrary({str(self.path)!r})"


# ---------------------------------------------------------------------------------------------
# Finding and loading the library.

_LOADED: Dict[str, RKLLMLibrary] = {}
_DEFAULT: Optional[RKLLMLibrary] = None

_ELF_MACHINES = {3: "x86 (32-bit)", 40: "ARM (32-bit)", 62: "x86_64", 183: "aarch64"}


def _elf_machine(path: Path) -> Optional[str]:
    """The CPU architecture an ELF file is built for, 'not an ELF file', or None if unreadable."""
    try:
        with open(path, "rb") as f:
            head = f.read(20)
    except OSError:
        return None
    if len(head) < 20 or head[:4] != b"\x7fELF":
        return "not an ELF file"
    machine = int.from_bytes(head[18:20], "little" if head[5] == 1 else "big")
    return _ELF_MACHINES.get(machine, f"ELF machine {machine}")


def find_library(search_dirs: Iterable[Union[str, os.PathLike]] = ()) -> Tuple[Optional[Path], List[str]]:
    """The librkllmrt.so to load and every place looked at, in order: $RKLLM_LIB, then
    `search_dirs` (the bundle folder), then SYSTEM_LIB_DIRS. With RKLLM_LIB set, only it counts."""
    env = os.environ.get(LIB_ENV)
    if env:
        path = Path(env)
        return (path if path.is_file() else None), [f"{LIB_ENV}={env}"]
    looked = []
    for d in [*search_dirs, *SYSTEM_LIB_DIRS]:
        candidate = Path(d) / LIBRARY_NAME
        looked.append(str(candidate))
        if candidate.is_file():
            return candidate, looked
    return None, looked


def load_library(search_dirs: Iterable[Union[str, os.PathLike]] = ()) -> RKLLMLibrary:
    """Find, load and check librkllmrt 1.3.0; raise RuntimeUnavailable saying what is wrong.

    Three different failures: not found (lists where it looked), found but not loadable (e.g. built
    for another architecture), loaded but not 1.3.0 (missing newer functions or old struct layout).
    """
    global _DEFAULT
    path, looked = find_library(search_dirs)
    if path is None:
        raise RuntimeUnavailable(
            f"librkllmrt.so (Rockchip's RKLLM runtime {RKLLM_VERSION}) was not found; looked at: " + ", ".join(looked),
            hint=INSTALL_HINT,
        )
    key = os.path.realpath(path)
    if key in _LOADED:
        return _LOADED[key]
    if not IS_LP64:
        raise RuntimeUnavailable(
            f"this binding supports 64-bit userlands only (aarch64); this Python is {platform.machine()} 32-bit",
            hint="use a 64-bit (arm64) OS image on the board",
        )
    try:
        cdll = ctypes.CDLL(str(path))
    except OSError as err:
        arch, host = _elf_machine(path), platform.machine()
        why = f"; it is built for {arch} and this machine is {host}" if arch and arch != host else ""
        if arch and arch.startswith("not an ELF"):
            why = "; it is not a shared library (not an ELF file)"
        raise RuntimeUnavailable(
            f"found {path} but could not load it: {err}{why}",
            hint=f"librkllmrt runs only on the aarch64 board; {INSTALL_HINT}",
        ) from err
    _check_version(cdll, path)
    lib = RKLLMLibrary(cdll, path)
    if os.environ.get(SKIP_LAYOUT_CHECK_ENV) != "1":
        problem = _probe_default_param(lib.default_param_bytes())
        if problem:
            raise RuntimeUnavailable(
                f"{path} is not librkllmrt {RKLLM_VERSION}: {problem}",
                hint=f"{INSTALL_HINT}. If you are sure it is {RKLLM_VERSION}, set {SKIP_LAYOUT_CHECK_ENV}=1 "
                "to skip this check, and please report it",
            )
    _LOADED[key] = lib
    if _DEFAULT is None:
        _DEFAULT = lib
    return lib


def _check_version(cdll: ctypes.CDLL, path: Path) -> None:
    """Refuse a library that lacks a function 1.3.0 has, naming the release it must predate."""
    missing = [name for name in _FUNCTIONS if not hasattr(cdll, name)]
    if not missing:
        return
    if any(name in missing for name in _CORE_FUNCTIONS):
        what = f"{path} is not librkllmrt (it has no {', '.join(n for n in _CORE_FUNCTIONS if n in missing)})"
    elif any(name in missing for name in _SINCE_1_2_0):
        what = f"this librkllmrt ({path}) is older than 1.2.0, and {RKLLM_VERSION} is required"
    elif any(name in missing for name in _SINCE_1_2_1):
        what = f"this librkllmrt ({path}) is older than 1.2.1, and {RKLLM_VERSION} is required"
    else:
        what = f"this librkllmrt ({path}) is not {RKLLM_VERSION}"
    raise RuntimeUnavailable(f"{what}; missing functions: {', '.join(missing)}", hint=INSTALL_HINT)


def default_library() -> RKLLMLibrary:
    """The first library load_library() loaded, loading one with the default search if none is."""
    return _DEFAULT if _DEFAULT is not None else load_library()
