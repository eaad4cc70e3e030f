"""`python -m host.rkllm_runner JOB.json`: the rkllm-toolkit step, run by host.convert in the toolkit's own venv.

Why a separate process: rkllm-toolkit 1.3.0 pins torch 2.6.0 and its own transformers (Python 3.9-3.12,
`rkllm-toolkit/packages/requirements.txt`) while the host venv runs torch 2.13. So host.convert
(host/decoder_rkllm.py) writes the inputs as files (the extracted decoder folder, the calibration set,
the held-out samples) plus a job file, and starts this module with the toolkit venv's Python
(`scripts/setup_rkllm_toolkit.sh` makes that venv). It imports only the standard library, numpy,
torch, transformers, the toolkit and calibration.holdout (numpy only). Its stdout and stderr are the
build log (host/decoder.log in the bundle); phases go to the job's status file (JSON lines, which
host.convert turns into console lines); the result (or the error) goes to the job's report file.

What the toolkit does not report, checked here from its side of the process:
- before build(): every calibration sample loads with *this* venv's torch (the host pickled it with
  its own) and has the shape the index gives; the index itself lists the samples written;
- during build(): which files of the calibration set the toolkit opened (an audit hook on `open`);
- the `Generating train split: N examples` line Hugging Face `datasets` prints when the toolkit loads
  a JSON dataset (HF_DATASETS_CACHE points at a fresh folder, so the line is always printed).
host.convert fails the stage when that evidence says the toolkit calibrated on nothing or on another
number of samples than it was given.

`--probe` prints, as JSON, what this interpreter would run: Python, torch and toolkit versions, where
`rkllm` is imported from, and whether it is the tests' stand-in (tests/standin_rkllm), which says so.
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
import platform
import re
import sys
import time
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import numpy as np

EXIT_OK, EXIT_FAILED, EXIT_NO_TOOLKIT, EXIT_INTERRUPTED = 0, 1, 3, 130
# printed by Hugging Face datasets when it builds a dataset from a file: the toolkit's own evidence
LOADED_EXAMPLES = re.compile(r"Generating train split: (\d+) examples")


# ---------------------------------------------------------------------------------------------
# What this interpreter runs
# ---------------------------------------------------------------------------------------------


def probe() -> dict[str, Any]:
    """Python, torch and rkllm-toolkit versions; raises ImportError when the toolkit cannot be imported."""
    from importlib import metadata

    import rkllm  # noqa: F401 - the package first: its own import errors name what is missing
    from rkllm.api import RKLLM  # noqa: F401

    try:
        version: Optional[str] = metadata.version("rkllm-toolkit")
    except metadata.PackageNotFoundError:
        version = getattr(rkllm, "__version__", None)
    try:
        torch_version: Optional[str] = metadata.version("torch")
    except metadata.PackageNotFoundError:
        torch_version = None
    return {"python": platform.python_version(), "executable": sys.executable, "rkllm_toolkit": version,
            "rkllm_module": str(Path(rkllm.__file__).parent), "standin": bool(getattr(rkllm, "STANDIN", False)),
            "torch": torch_version}


# ---------------------------------------------------------------------------------------------
# The calibration set, as this venv's torch sees it
# ---------------------------------------------------------------------------------------------


def check_sample_index(index_path: str | Path, hidden: Optional[int] = None) -> dict[str, Any]:
    """Rockchip's 1.3.0 sample layout read back: every `sample` (relative to the index's folder) unpickles
    to forward kwargs whose inputs_embeds is [1, token_nums, hidden]. Returns counts; ValueError otherwise."""
    index_path = Path(index_path)
    entries = json.loads(index_path.read_text(encoding="utf-8"))
    if not isinstance(entries, list) or not entries:
        raise ValueError(f"{index_path}: not a non-empty JSON list")
    tokens, files = 0, []
    for i, entry in enumerate(entries):
        if not isinstance(entry, dict) or not isinstance(entry.get("sample"), str) or not isinstance(
                entry.get("token_nums"), int):
            raise ValueError(f"{index_path}: entry {i} is not {{'sample': str, 'token_nums': int}}")
        path = index_path.parent / entry["sample"]
        try:
            with open(path, "rb") as f:
                kwargs = pickle.load(f)
        except (OSError, pickle.UnpicklingError, EOFError, AttributeError, ImportError) as exc:
            raise ValueError(f"{path}: cannot be unpickled here ({type(exc).__name__}: {exc})") from exc
        embeds = kwargs.get("inputs_embeds") if isinstance(kwargs, dict) else None
        shape = tuple(getattr(embeds, "shape", ()))
        want = (1, entry["token_nums"], hidden if hidden else shape[-1] if shape else -1)
        if shape != want:
            raise ValueError(f"{path}: inputs_embeds has shape {list(shape)}, the index says {list(want)}")
        tokens += entry["token_nums"]
        files.append(str(path.resolve()))
    return {"samples": len(entries), "tokens": tokens, "files": files}


def count_input_embed_json(path: str | Path) -> dict[str, Any]:
    """The input_embed JSON layout's entry count (calibration.decoder_dataset.validate_rkllm_dataset checks it fully)."""
    entries = json.loads(Path(path).read_text(encoding="utf-8"))
    if not isinstance(entries, list) or not entries:
        raise ValueError(f"{path}: not a non-empty JSON list")
    return {"samples": len(entries), "files": [str(Path(path).resolve())]}


class OpenedFiles:
    """Paths under `root` opened while `recording` (an audit hook: Python's open, io.open and os.open)."""

    def __init__(self, root: Path):
        self.root = str(root.resolve())
        self.recording = False
        self.paths: set[str] = set()
        sys.addaudithook(self._hook)

    def _hook(self, event: str, args: tuple) -> None:
        if event != "open" or not self.recording or not args or not isinstance(args[0], (str, bytes, os.PathLike)):
            return
        try:
            path = os.path.abspath(os.fsdecode(args[0]))
        except (TypeError, ValueError):
            return
        if path.startswith(self.root):
            self.paths.add(os.path.realpath(path))


def loaded_examples(log_text: str) -> Optional[int]:
    """The last `Generating train split: N examples` count in the toolkit's log, or None."""
    counts = LOADED_EXAMPLES.findall(log_text)
    return int(counts[-1]) if counts else None


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


def load_reference_decoder(folder: str | Path) -> Any:
    """The extracted decoder folder in this venv's transformers, fp32 (the accuracy reference)."""
    import torch
    from transformers import AutoModelForCausalLM

    try:
        model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32)
    except TypeError:  # transformers 4.x spells it torch_dtype
        model = AutoModelForCausalLM.from_pretrained(str(folder), torch_dtype=torch.float32)
    return model.eval()


# ---------------------------------------------------------------------------------------------
# The job
# ---------------------------------------------------------------------------------------------


class StepFailed(Exception):
    """A toolkit call returned non-zero, or the calibration set cannot be used."""


class Status:
    """Phases as JSON lines in the job's status file, read by host.convert for its console lines."""

    def __init__(self, path: Optional[str]):
        self.path = path
        self.t0 = time.monotonic()

    def __call__(self, phase: str, **extra: Any) -> None:
        print(f"\n===== {phase} ({time.strftime('%Y-%m-%d %H:%M:%S')}) =====", flush=True)
        if self.path:
            with open(self.path, "a", encoding="utf-8") as f:
                f.write(json.dumps({"phase": phase, "t": round(time.monotonic() - self.t0, 1), **extra}) + "\n")


def _call(what: str, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> None:
    ret = fn(*args, **kwargs)
    if ret != 0:
        raise StepFailed(f"rkllm-toolkit {what} failed (returned {ret})")


def run_job(job: dict[str, Any]) -> dict[str, Any]:
    """Load, calibrate + quantize, export and measure, as the job file says (host/decoder_rkllm.py writes it)."""
    from rkllm.api import RKLLM

    status = Status(job.get("status"))
    options, layout, dataset = job["options"], job["layout"], Path(job["dataset"])
    report: dict[str, Any] = {"model": Path(job["rkllm"]).name, "options": options, "layout": layout,
                              "dataset": dataset.name, **{k: v for k, v in probe().items() if k != "executable"}}
    report["toolkit"] = report.pop("rkllm_toolkit")
    print(f"rkllm runner: {json.dumps({k: report[k] for k in ('toolkit', 'rkllm_module', 'standin', 'torch', 'python')})}",
          flush=True)
    status("checking the calibration set")
    try:
        given = check_sample_index(dataset, job.get("hidden_size")) if layout == "samples" \
            else count_input_embed_json(dataset)
    except ValueError as exc:
        raise StepFailed(f"the calibration set cannot be used by this venv: {exc}") from exc
    report["calibration"] = {"layout": layout, "samples": given["samples"]}
    opened = OpenedFiles(dataset.parent)
    t0 = time.monotonic()
    llm = RKLLM()
    status("load_huggingface")
    _call(f"load_huggingface({job['decoder_dir']})", llm.load_huggingface, model=job["decoder_dir"], device="cpu",
          dtype=options["load_dtype"])
    status("build (calibration and quantization)")
    opened.recording = True
    try:
        _call("build", llm.build, do_quantization=True, optimization_level=options["optimization_level"],
              quantized_dtype=options["quantized_dtype"], quantized_algorithm=options["quantized_algorithm"],
              target_platform=options["target_platform"], num_npu_core=options["num_npu_core"],
              max_context=options["max_context"], dataset=str(dataset))
    finally:
        opened.recording = False
    wanted = {os.path.realpath(p) for p in given["files"]}
    report["calibration"]["read_by_toolkit"] = {"index" if layout == "samples" else "file":
                                                os.path.realpath(dataset) in opened.paths,
                                                "sample_files": len(wanted & opened.paths) if layout == "samples" else None}
    status("export_rkllm")
    _call(f"export_rkllm({job['rkllm']})", llm.export_rkllm, job["rkllm"])
    report["build_s"] = round(time.monotonic() - t0, 1)
    report["rkllm_mb"] = round(Path(job["rkllm"]).stat().st_size / 1e6, 1)
    if job.get("holdout"):
        from calibration.holdout import load_holdout

        status("get_logits (held-out accuracy)")
        report["accuracy"] = evaluate_holdout(llm, load_reference_decoder(job["decoder_dir"]),
                                              load_holdout(job["holdout"]))
    status("done")
    return report


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m host.rkllm_runner",
                                     description="Run the rkllm-toolkit step of host.convert (in the toolkit's venv).")
    parser.add_argument("job", nargs="?", help="the job file host.convert wrote")
    parser.add_argument("--probe", action="store_true", help="print this interpreter's toolkit as JSON and exit")
    args = parser.parse_args(argv)
    if args.probe:
        try:
            print(json.dumps(probe()))
        except ImportError as exc:
            print(json.dumps({"error": f"{type(exc).__name__}: {exc}", "python": platform.python_version(),
                              "executable": sys.executable}))
            return EXIT_NO_TOOLKIT
        return EXIT_OK
    if not args.job:
        parser.error("give the job file (or --probe)")
    job = json.loads(Path(args.job).read_text(encoding="utf-8"))
    try:
        report = run_job(job)
        code = EXIT_OK
    except StepFailed as exc:
        report, code = {"error": str(exc)}, EXIT_FAILED
    except ImportError as exc:
        report, code = {"error": f"rkllm-toolkit cannot be imported here: {exc}"}, EXIT_NO_TOOLKIT
    except KeyboardInterrupt:
        report, code = {"error": "interrupted"}, EXIT_INTERRUPTED
    except Exception as exc:  # the toolkit's own exceptions: the log has its traceback, the report the gist
        import traceback

        traceback.print_exc()
        report, code = {"error": f"rkllm-toolkit raised {type(exc).__name__}: {exc}"}, EXIT_FAILED
    sys.stdout.flush()
    Path(job["report"]).write_text(json.dumps(report, indent=2, default=str) + "\n", encoding="utf-8")
    return code


if __name__ == "__main__":
    sys.exit(main())
