"""The ctypes binding of rkllm.h 1.3.0 against numbers worked out independently.

The tables below were computed by hand from the LP64 rules (pointers/size_t 8 bytes, int/float 4,
bool 1, each field at its alignment, each struct padded to its largest member's alignment) from
the header of rknn-llm tag release-v1.3.0, and agree with what gcc prints for tests/c/rkllm_abi.h
(test_c_compiler_lays_out_the_same). DESIGN.md's RKLLMParam 184 / RKLLMInput 160 / RKLLMResult 72
are among them.
"""

from __future__ import annotations

import ctypes
import os
import platform
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from board import rkllm_h

C_DIR = Path(__file__).parent / "c"
REPO = Path(__file__).resolve().parents[1]

LP64 = pytest.mark.skipif(not rkllm_h.IS_LP64, reason="the tables are for LP64 (aarch64/x86_64) Python")
needs_gcc = pytest.mark.skipif(shutil.which("gcc") is None, reason="gcc is not installed")

SIZES = {
    "RKLLMExtendParam": 120,
    "RKLLMParam": 184,
    "RKLLMLoraAdapter": 24,
    "RKLLMEmbedInput": 16,
    "RKLLMTokenInput": 16,
    "RKLLMMultiModalInputImage": 64,
    "RKLLMMultiModalInputVideo": 72,
    "RKLLMMultiModalInput": 144,
    "RKLLMInput": 160,
    "RKLLMLoraParam": 8,
    "RKLLMPromptCacheParam": 16,
    "RKLLMCrossAttnParam": 40,
    "RKLLMSamplingParam": 36,
    "RKLLMInferParam": 40,
    "RKLLMResultLastHiddenLayer": 16,
    "RKLLMResultLogits": 16,
    "RKLLMPerfStat": 20,
    "RKLLMResult": 72,
    "RKLLMCallback": 48,
}

OFFSETS = {
    "RKLLMExtendParam": {"base_domain_id": 0, "embed_flash": 4, "enabled_cpus_num": 5, "enabled_cpus_mask": 8,
                         "n_batch": 12, "use_cross_attn": 13, "reserved": 14},
    "RKLLMParam": {"model_path": 0, "max_context_len": 8, "max_new_tokens": 12, "top_k": 16, "n_keep": 20,
                   "top_p": 24, "temperature": 28, "repeat_penalty": 32, "frequency_penalty": 36,
                   "presence_penalty": 40, "mirostat": 44, "mirostat_tau": 48, "mirostat_eta": 52,
                   "skip_special_token": 56, "ignore_eos_token": 57, "is_async": 58, "extend_param": 60},
    "RKLLMLoraAdapter": {"lora_adapter_path": 0, "lora_adapter_name": 8, "scale": 16},
    "RKLLMEmbedInput": {"embed": 0, "n_tokens": 8},
    "RKLLMTokenInput": {"input_ids": 0, "n_tokens": 8},
    "RKLLMMultiModalInputImage": {"image_embed": 0, "n_image_tokens": 8, "n_image": 16, "image_start": 24,
                                  "image_end": 32, "image_content": 40, "image_width": 48, "image_height": 56},
    "RKLLMMultiModalInputVideo": {"video_embed": 0, "n_frame_tokens": 8, "n_frame_per_video": 16, "n_video": 24,
                                  "video_start": 32, "video_end": 40, "video_content": 48, "frame_width": 56,
                                  "frame_height": 64},
    "RKLLMMultiModalInput": {"prompt": 0, "image": 8, "video": 72},
    "RKLLMInput": {"role": 0, "enable_thinking": 8, "input_type": 12, "prompt_input": 16, "embed_input": 16,
                   "token_input": 16, "multimodal_input": 16},
    "RKLLMLoraParam": {"lora_adapter_name": 0},
    "RKLLMPromptCacheParam": {"save_prompt_cache": 0, "prompt_cache_path": 8},
    "RKLLMCrossAttnParam": {"encoder_k_cache": 0, "encoder_v_cache": 8, "encoder_mask": 16, "encoder_pos": 24,
                            "num_tokens": 32},
    "RKLLMSamplingParam": {"top_k": 0, "top_p": 4, "temperature": 8, "repeat_penalty": 12, "frequency_penalty": 16,
                           "presence_penalty": 20, "mirostat": 24, "mirostat_tau": 28, "mirostat_eta": 32},
    "RKLLMInferParam": {"mode": 0, "lora_params": 8, "prompt_cache_params": 16, "sampling_params": 24,
                        "keep_history": 32, "max_new_tokens": 36},
    "RKLLMResultLastHiddenLayer": {"hidden_states": 0, "embd_size": 8, "num_tokens": 12},
    "RKLLMResultLogits": {"logits": 0, "vocab_size": 8, "num_tokens": 12},
    "RKLLMPerfStat": {"prefill_time_ms": 0, "prefill_tokens": 4, "generate_time_ms": 8, "generate_tokens": 12,
                      "memory_usage_mb": 16},
    "RKLLMResult": {"text": 0, "token_id": 8, "last_hidden_layer": 16, "logits": 32, "perf": 48},
    "RKLLMCallback": {"result_callback": 0, "result_userdata": 8, "tokenizer_callback": 16,
                      "tokenizer_userdata": 24, "embed_callback": 32, "embed_userdata": 40},
}

# Each field's C type as the header writes it (int and enum-typed fields are int32 on LP64; the anonymous
# structs/union under the names the binding gives them).
TYPES = {
    "RKLLMExtendParam": "int32 int8 int8 uint32 uint8 int8 uint8[104]",
    "RKLLMParam": "char* int32 int32 int32 int32 float float float float float int32 float float bool bool bool "
                  "RKLLMExtendParam",
    "RKLLMLoraAdapter": "char* char* float",
    "RKLLMEmbedInput": "float* size_t",
    "RKLLMTokenInput": "int32* size_t",
    "RKLLMMultiModalInputImage": "float* size_t size_t char* char* char* size_t size_t",
    "RKLLMMultiModalInputVideo": "float* size_t size_t size_t char* char* char* size_t size_t",
    "RKLLMMultiModalInput": "char* RKLLMMultiModalInputImage RKLLMMultiModalInputVideo",
    "RKLLMInput": "char* bool int32 RKLLMInputUnion",
    "RKLLMInputUnion": "char* RKLLMEmbedInput RKLLMTokenInput RKLLMMultiModalInput",
    "RKLLMLoraParam": "char*",
    "RKLLMPromptCacheParam": "int32 char*",
    "RKLLMCrossAttnParam": "float* float* float* int32* int32",
    "RKLLMSamplingParam": "int32 float float float float float int32 float float",
    "RKLLMInferParam": "int32 RKLLMLoraParam* RKLLMPromptCacheParam* RKLLMSamplingParam* int32 int32",
    "RKLLMResultLastHiddenLayer": "float* int32 int32",
    "RKLLMResultLogits": "float* int32 int32",
    "RKLLMPerfStat": "float int32 float int32 float",
    "RKLLMResult": "char* int32 RKLLMResultLastHiddenLayer RKLLMResultLogits RKLLMPerfStat",
    "RKLLMCallback": "LLMResultCallback void* LLMTokenizerCallback void* LLMGetEmbedCallback void*",
}

FUNCTIONS = {
    "rkllm_createDefaultParam", "rkllm_init", "rkllm_load_lora", "rkllm_load_prompt_cache",
    "rkllm_release_prompt_cache", "rkllm_destroy", "rkllm_run", "rkllm_run_async", "rkllm_abort",
    "rkllm_is_running", "rkllm_clear_kv_cache", "rkllm_get_kv_cache_size", "rkllm_set_chat_template",
    "rkllm_set_function_tools", "rkllm_set_cross_attn_params",
}


def _field_names(cls: type) -> list[str]:
    """Field names as C code sees them: an anonymous member's fields count as the parent's."""
    names = []
    for name, ftype, *_ in cls._fields_:
        names += _field_names(ftype) if name in getattr(cls, "_anonymous_", ()) else [name]
    return names


_SCALARS = {
    ctypes.c_int32: "int32", ctypes.c_uint32: "uint32", ctypes.c_int8: "int8", ctypes.c_uint8: "uint8",
    ctypes.c_bool: "bool", ctypes.c_float: "float", ctypes.c_size_t: "size_t", ctypes.c_char_p: "char*",
    ctypes.c_void_p: "void*",
}
_CALLBACKS = ("LLMResultCallback", "LLMTokenizerCallback", "LLMGetEmbedCallback")


def _c_type(t: type) -> str:
    if t in _SCALARS:
        return _SCALARS[t]
    if issubclass(t, ctypes.Array):
        return f"{_c_type(t._type_)}[{t._length_}]"
    if issubclass(t, ctypes._Pointer):
        return _c_type(t._type_) + "*"
    return next((n for n in _CALLBACKS if getattr(rkllm_h, n) is t), t.__name__)


@pytest.mark.parametrize("name", sorted(TYPES))
def test_field_types_as_in_the_header(name):
    assert " ".join(_c_type(f[1]) for f in getattr(rkllm_h, name)._fields_) == TYPES[name]


@LP64
@pytest.mark.parametrize("name", sorted(SIZES))
def test_struct_size(name):
    assert ctypes.sizeof(getattr(rkllm_h, name)) == SIZES[name]


@LP64
@pytest.mark.parametrize("name", sorted(OFFSETS))
def test_fields_named_and_placed_as_in_the_header(name):
    cls = getattr(rkllm_h, name)
    assert _field_names(cls) == list(OFFSETS[name])  # every field, in header order, nothing extra
    assert {f: getattr(cls, f).offset for f in OFFSETS[name]} == OFFSETS[name]


@needs_gcc
def test_c_compiler_lays_out_the_same(tmp_path):
    exe = tmp_path / "abi_layout"
    subprocess.run(["gcc", "-std=c11", "-Wall", "-Werror", f"-I{C_DIR}", str(C_DIR / "abi_layout.c"), "-o", str(exe)],
                   check=True, capture_output=True)
    sizes, offsets = {}, {}
    for line in subprocess.run([str(exe)], check=True, capture_output=True, text=True).stdout.splitlines():
        kind, what, value = line.split()
        if kind == "size":
            sizes[what] = int(value)
        else:
            struct, field = what.split(".")
            offsets.setdefault(struct, {})[field] = int(value)
    assert sizes == SIZES
    assert offsets == OFFSETS


def test_enum_values():
    assert {m.name: int(m) for m in rkllm_h.LLMCallState} == {
        "RKLLM_RUN_NORMAL": 0, "RKLLM_RUN_WAITING": 1, "RKLLM_RUN_FINISH": 2, "RKLLM_RUN_ERROR": 3}
    assert {m.name: int(m) for m in rkllm_h.RKLLMInputType} == {
        "RKLLM_INPUT_PROMPT": 0, "RKLLM_INPUT_TOKEN": 1, "RKLLM_INPUT_EMBED": 2, "RKLLM_INPUT_MULTIMODAL": 3}
    assert {m.name: int(m) for m in rkllm_h.RKLLMInferMode} == {
        "RKLLM_INFER_GENERATE": 0, "RKLLM_INFER_GET_LAST_HIDDEN_LAYER": 1, "RKLLM_INFER_GET_LOGITS": 2}
    assert [getattr(rkllm_h, f"CPU{i}") for i in range(8)] == [1, 2, 4, 8, 16, 32, 64, 128]
    assert not hasattr(ctypes.c_int, "RKLLM_RUN_NORMAL")  # enums are not pinned onto ctypes types


def test_callback_typedefs():
    p = ctypes.POINTER
    assert rkllm_h.LLMResultCallback._restype_ is ctypes.c_int  # 0 continue, 1 pause: an int, not void
    assert rkllm_h.LLMResultCallback._argtypes_ == (p(rkllm_h.RKLLMResult), ctypes.c_void_p, ctypes.c_int)
    assert rkllm_h.LLMTokenizerCallback._restype_ is ctypes.c_int
    assert rkllm_h.LLMTokenizerCallback._argtypes_ == (
        ctypes.c_void_p, p(ctypes.c_char), ctypes.c_int32, p(ctypes.c_int32), ctypes.c_int32)
    assert rkllm_h.LLMGetEmbedCallback._restype_ is ctypes.c_int
    assert rkllm_h.LLMGetEmbedCallback._argtypes_ == (
        ctypes.c_void_p, p(ctypes.c_int32), ctypes.c_uint64, ctypes.c_void_p, ctypes.c_uint64)


def test_every_function_declared_with_its_prototype():
    assert set(rkllm_h._FUNCTIONS) == FUNCTIONS
    p, h, i = ctypes.POINTER, rkllm_h.LLMHandle, ctypes.c_int
    expected = {
        "rkllm_createDefaultParam": ([], rkllm_h.RKLLMParam),
        "rkllm_init": ([p(h), p(rkllm_h.RKLLMParam), p(rkllm_h.RKLLMCallback)], i),  # 1.3.0: a struct of callbacks
        "rkllm_run": ([h, p(rkllm_h.RKLLMInput), p(rkllm_h.RKLLMInferParam), ctypes.c_void_p], i),
        "rkllm_clear_kv_cache": ([h, i, p(i), p(i)], i),
        "rkllm_get_kv_cache_size": ([h, p(i)], i),
        "rkllm_destroy": ([h], i),
        "rkllm_abort": ([h], i),
    }
    for name, (argtypes, restype) in expected.items():
        assert rkllm_h._FUNCTIONS[name] == (argtypes, restype), name
    assert all(restype is i for name, (_, restype) in rkllm_h._FUNCTIONS.items() if name != "rkllm_createDefaultParam")


def test_imports_without_any_librkllmrt():
    """The board modules import on x86 with no runtime and pull in nothing heavy."""
    env = {k: v for k, v in os.environ.items() if k != rkllm_h.LIB_ENV}
    code = (
        "import sys, board.rkllm_h as r, board.decoder_rkllm\n"
        "assert r._LOADED == {} and r._DEFAULT is None\n"
        "bad = [m for m in ('torch', 'transformers', 'host') if m in sys.modules]\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, check=True)


@pytest.mark.rk3588
@pytest.mark.skipif(platform.machine() != "aarch64", reason="needs an RK3588 board with librkllmrt 1.3.0 installed")
def test_installed_runtime_passes_the_version_checks():
    """On the board: confirms the premise of the layout probe (1.3.0's default extend_param.n_batch is 1)."""
    lib = rkllm_h.load_library()
    param = lib.rkllm_createDefaultParam()
    assert param.extend_param.n_batch == 1
    assert param.max_context_len > 0 and param.top_k >= 0 and 0.0 < param.top_p <= 1.0
