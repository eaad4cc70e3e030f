"""Build `decoder.rkllm` with Rockchip's rkllm-toolkit 1.3.0, and measure it against PyTorch.

The toolkit is optional on every machine (it is not on PyPI and pins torch 2.6): it is imported only
here, lazily, and its absence is a RuntimeUnavailable that says how to install it. Nothing in this
project imitates its results.

The build follows Rockchip's documented call sequence: `load_huggingface(model=<the extracted Llama
folder>)`, `build(do_quantization=True, quantized_dtype='w8a8', quantized_algorithm='normal',
optimization_level=1, target_platform='rk3588', num_npu_core=3, max_context=..., dataset=<json>)`,
`export_rkllm(path)`. After `build()` the toolkit can run the quantized model on x86
(`get_logits`, inputs given as for a Hugging Face forward); the held-out samples are run through it
and through the fp32 PyTorch decoder on the same embeddings, and the agreement is written as JSON
next to the model. The toolkit's console output goes to a log file beside it.
"""

from __future__ import annotations

import contextlib
import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Sequence

import numpy as np

from board.errors import InputError, RuntimeUnavailable, SmolVLMError
from board.system_checks import PLATFORM
from host.toolkit_console import heartbeat, require_conversion_host, toolkit_output

MAX_CONTEXT_LIMIT = 16384  # rkllm-toolkit 1.3.0: at most 16384, a multiple of 32
CONTEXT_ALIGN = 32
TOOLKIT_VERSION = "1.3.0"
INSTALL_HINT = (
    "rkllm-toolkit is Rockchip's x86_64 Linux wheel, published only in the GitHub repository "
    "airockchip/rknn-llm (release v1.3.0, folder rkllm-toolkit/packages/): take "
    "rkllm_toolkit-1.3.0-cp3XX-cp3XX-linux_x86_64.whl for your Python (cp311 for Python 3.11) and run "
    "`.venv/bin/pip install --no-deps <wheel>`. Its metadata pins torch==2.6.0 and transformers==5.8.0: "
    "installed with its dependencies it would replace this venv's torch 2.13 (and pull GBs of CUDA "
    "packages), so keep --no-deps and add what it imports from rkllm-toolkit/packages/requirements.txt "
    "without torch/torchvision; or give it a separate venv with torch 2.6.0 (CPU build). "
    "Without it, convert with --skip-decoder: everything else is built and the bundle runs in x86 emulation"
)


class DecoderBuildError(SmolVLMError):
    """rkllm-toolkit refused a step (load, build, export); its log says why."""


@dataclass
class RKLLMOptions:
    """The build settings; the defaults are the ones Rockchip documents for rk3588 W8A8."""

    max_context: int = 4096
    quantized_dtype: str = "w8a8"
    quantized_algorithm: str = "normal"
    optimization_level: int = 1
    target_platform: str = PLATFORM
    num_npu_core: int = 3
    load_dtype: str = "float32"


def validate_max_context(value: Any, *, model_max: Optional[int] = None) -> int:
    """The context length as an int the toolkit accepts, or an InputError that says which values are."""
    try:
        n = int(str(value).strip())
    except ValueError:
        raise InputError(f"--max-context must be a whole number, got {value!r}") from None
    if n < CONTEXT_ALIGN or n > MAX_CONTEXT_LIMIT or n % CONTEXT_ALIGN:
        nearest = min(MAX_CONTEXT_LIMIT, max(CONTEXT_ALIGN, round(n / CONTEXT_ALIGN) * CONTEXT_ALIGN))
        raise InputError(
            f"--max-context {n} is not allowed: rkllm-toolkit {TOOLKIT_VERSION} takes a multiple of "
            f"{CONTEXT_ALIGN} between {CONTEXT_ALIGN} and {MAX_CONTEXT_LIMIT}",
            hint=f"try --max-context {nearest}",
        )
    if model_max is not None and n > model_max:
        raise InputError(
            f"--max-context {n} exceeds the model's trained context ({model_max} positions)",
            hint=f"use at most {model_max - model_max % CONTEXT_ALIGN}",
        )
    return n


def require_rkllm_toolkit() -> type:
    """The RKLLM class, or a RuntimeUnavailable that says how to install the toolkit."""
    require_conversion_host("rkllm-toolkit")
    try:
        from rkllm.api import RKLLM
    except ImportError as exc:
        raise RuntimeUnavailable(f"rkllm-toolkit {TOOLKIT_VERSION} is not installed ({exc})", hint=INSTALL_HINT) from exc
    return RKLLM


def toolkit_version() -> Optional[str]:
    from importlib import metadata

    try:
        return metadata.version("rkllm-toolkit")
    except metadata.PackageNotFoundError:
        return None


@contextlib.contextmanager
def _output_to(log_path: Path, title: str, heartbeat_s: int = 0) -> Iterator[None]:
    """The toolkit's chatter to log_path, with a 'still running' line on the console every heartbeat_s."""
    with toolkit_output(log_path, title) as console, heartbeat(console, "rkllm", title, heartbeat_s):
        yield


def _check(ret: Any, what: str, log: Path) -> None:
    if ret != 0:
        raise DecoderBuildError(f"rkllm-toolkit {what} failed (returned {ret})", hint=f"see the toolkit's log: {log}")


# ---------------------------------------------------------------------------------------------
# Accuracy: the toolkit's x86 run of the quantized model vs the fp32 PyTorch decoder
# ---------------------------------------------------------------------------------------------


def logit_agreement(actual: np.ndarray, expected: np.ndarray) -> dict[str, float]:
    """How close quantized logits [n, vocab] are to the reference: next-token argmax agreement over
    all positions and at the last one (the first answer token), mean KL(ref || quantized), mean cosine."""
    a = actual.astype(np.float64)
    e = expected.astype(np.float64)
    log_pa = a - a.max(1, keepdims=True)
    log_pa -= np.log(np.exp(log_pa).sum(1, keepdims=True))
    log_pe = e - e.max(1, keepdims=True)
    log_pe -= np.log(np.exp(log_pe).sum(1, keepdims=True))
    kl = (np.exp(log_pe) * (log_pe - log_pa)).sum(1)
    cos = (a * e).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(e, axis=1) + 1e-30)
    return {
        "top1_agreement": float((a.argmax(1) == e.argmax(1)).mean()),
        "last_token_top1_match": bool(a[-1].argmax() == e[-1].argmax()),
        "kl_mean": float(kl.mean()),
        "cosine_mean": float(cos.mean()),
        "positions": int(len(a)),
    }


def _toolkit_logits(llm: Any, inputs: dict[str, Any]) -> Optional[np.ndarray]:
    out = llm.get_logits(inputs)
    if out is None:
        return None
    array = out.detach().float().cpu().numpy() if hasattr(out, "detach") else np.asarray(out, np.float32)
    return array.reshape(-1, array.shape[-1])


def evaluate_holdout(llm: Any, decoder: Any, holdout: Sequence[dict[str, Any]],
                     progress: Optional[Callable[[str], None]] = None) -> dict[str, Any]:
    """Run held-out samples through the toolkit's quantized model and the PyTorch decoder.

    Embedding input is what the board feeds, so it is tried first (`inputs_embeds`). If this toolkit's
    get_logits does not take embeddings, text-only samples are still measured through `input_ids` (the
    toolkit embeds them with its own table) and image samples are reported as not measured, with why.
    """
    import torch

    results, skipped = [], []
    embeds_unsupported: Optional[str] = None  # why get_logits does not take embeddings, once known
    for i, sample in enumerate(holdout):
        embeds = torch.from_numpy(np.ascontiguousarray(sample["embeds"], np.float32))[None]
        with torch.no_grad():
            expected = decoder(inputs_embeds=embeds).logits[0].float().numpy()
        actual, how = None, "inputs_embeds"
        if embeds_unsupported is None:
            try:
                actual = _toolkit_logits(llm, {"inputs_embeds": embeds})
            except Exception as exc:  # the toolkit's own error types are not importable
                embeds_unsupported = f"get_logits(inputs_embeds) raised {type(exc).__name__}: {exc}"
            else:
                if actual is None:
                    embeds_unsupported = "get_logits(inputs_embeds) returned None"
        if actual is None and sample["kind"] == "text":
            how = "input_ids"
            actual = _toolkit_logits(llm, {"input_ids": torch.from_numpy(sample["input_ids"])[None]})
        if actual is None or actual.shape != expected.shape:
            reason = embeds_unsupported if actual is None else f"logits shape {actual.shape} != {expected.shape}"
            skipped.append({"name": sample["name"], "kind": sample["kind"], "reason": reason})
            continue
        results.append({"name": sample["name"], "kind": sample["kind"], "input": how, **logit_agreement(actual, expected)})
        if progress:
            progress(f"held-out {i + 1}/{len(holdout)} {sample['name']}: top-1 agreement "
                     f"{results[-1]['top1_agreement']:.3f}, KL {results[-1]['kl_mean']:.4f}")
    summary: dict[str, Any] = {"samples": results, "not_measured": skipped, "measured": len(results)}
    if results:
        summary.update(
            top1_agreement_mean=float(np.mean([r["top1_agreement"] for r in results])),
            top1_agreement_min=float(np.min([r["top1_agreement"] for r in results])),
            last_token_top1_match=float(np.mean([r["last_token_top1_match"] for r in results])),
            kl_mean=float(np.mean([r["kl_mean"] for r in results])),
            cosine_mean=float(np.mean([r["cosine_mean"] for r in results])),
        )
    return summary


# ---------------------------------------------------------------------------------------------
# The build
# ---------------------------------------------------------------------------------------------


def build_decoder_rkllm(
    decoder_dir: str | Path,
    dataset: str | Path,
    rkllm_path: str | Path,
    *,
    options: Optional[RKLLMOptions] = None,
    holdout: Optional[Sequence[dict[str, Any]]] = None,
    progress: Optional[Callable[[str], None]] = None,
) -> dict[str, Any]:
    """Quantize and export the extracted decoder folder; measure it on `holdout` (calibration.decoder_dataset
    .load_holdout samples) when given. Returns the report, also written as `<model>.accuracy.json`."""
    options = options or RKLLMOptions()
    validate_max_context(options.max_context)
    RKLLM = require_rkllm_toolkit()
    say = progress or (lambda message: None)
    rkllm_path = Path(rkllm_path)
    rkllm_path.parent.mkdir(parents=True, exist_ok=True)
    stem = rkllm_path.with_suffix("")
    log, report_path = Path(f"{stem}.log"), Path(f"{stem}.accuracy.json")
    log.write_text("")
    report: dict[str, Any] = {"model": rkllm_path.name, "toolkit": toolkit_version(), "options": asdict(options),
                              "dataset": Path(dataset).name}
    t0 = time.monotonic()
    llm = RKLLM()
    say(f"rkllm-toolkit: loading {decoder_dir} (log: {log})")
    beat = 30 if progress else 0
    with _output_to(log, "load_huggingface", beat):
        ret = llm.load_huggingface(model=str(decoder_dir), device="cpu", dtype=options.load_dtype)
    _check(ret, f"load_huggingface({decoder_dir})", log)
    say(f"rkllm-toolkit: quantizing ({options.quantized_dtype}, {options.quantized_algorithm}, "
        f"max_context {options.max_context}); this takes minutes")
    with _output_to(log, "build (quantization)", beat):
        ret = llm.build(
            do_quantization=True, optimization_level=options.optimization_level,
            quantized_dtype=options.quantized_dtype, quantized_algorithm=options.quantized_algorithm,
            target_platform=options.target_platform, num_npu_core=options.num_npu_core,
            max_context=options.max_context, dataset=str(dataset),
        )
    _check(ret, "build", log)
    with _output_to(log, "export_rkllm", beat):
        ret = llm.export_rkllm(str(rkllm_path))
    _check(ret, f"export_rkllm({rkllm_path})", log)
    report["build_s"] = round(time.monotonic() - t0, 1)
    report["rkllm_mb"] = round(rkllm_path.stat().st_size / 1e6, 1)
    say(f"rkllm-toolkit: {rkllm_path.name} written ({report['rkllm_mb']} MB, {report['build_s']}s)")
    if holdout:
        from host.decoder_export import load_decoder

        with _output_to(log, "get_logits (held-out accuracy)", beat):
            report["accuracy"] = evaluate_holdout(llm, load_decoder(decoder_dir), holdout, progress=None)
        accuracy = report["accuracy"]
        if accuracy["measured"]:
            say(f"held-out accuracy ({accuracy['measured']} samples): next-token top-1 agreement mean "
                f"{accuracy['top1_agreement_mean']:.3f} / min {accuracy['top1_agreement_min']:.3f}, "
                f"KL {accuracy['kl_mean']:.4f}")
        if accuracy["not_measured"]:
            say(f"{len(accuracy['not_measured'])} held-out samples not measured: {accuracy['not_measured'][0]['reason']}")
    report_path.write_text(json.dumps(report, indent=2) + "\n")
    return report
