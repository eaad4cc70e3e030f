"""Build `decoder.rkllm` with Rockchip's rkllm-toolkit 1.3.0, in the toolkit's own venv, and measure it.

rkllm-toolkit 1.3.0 pins torch 2.6.0 and its own transformers (Python 3.9-3.12); this venv runs torch
2.13. So the toolkit gets a venv of its own (`scripts/setup_rkllm_toolkit.sh WHEEL` makes `.venv-rkllm`
with upstream's pins and a CPU torch 2.6.0), and this module runs the step there as a subprocess
(`python -m host.rkllm_runner JOB`, see that module) on files host.convert wrote: the extracted Llama
folder, the calibration set and the held-out samples. The toolkit's output is the log beside the model
(`host/decoder.log` in the bundle), a heartbeat line shows the phase every 30 s, and a missing venv or
wheel is a RuntimeUnavailable that says how to make it. Nothing in this project imitates the
toolkit's results; the tests' stand-in (tests/standin_rkllm) says what it is in the log.

The build follows Rockchip's documented call sequence: `load_huggingface(model=<folder>)`,
`build(do_quantization=True, quantized_dtype='w8a8', quantized_algorithm='normal',
optimization_level=0, target_platform='rk3588', num_npu_core=3, max_context=..., dataset=<file>)`,
`export_rkllm(path)`. optimization_level is 0 by default: rknn-llm's benchmark.md says "All models
should be converted with optimization_level set to 0" (its published figures), while the multimodal
example's export script uses 1; it is an option and the manifest records it. After `build()` the
toolkit runs the quantized model on x86 (`get_logits`): the held-out samples go through it and through
the fp32 PyTorch decoder, and the agreement is written as JSON next to the model. Then the runner's
evidence that the toolkit read the calibration set is checked (`check_calibration_read`).
"""

from __future__ import annotations

import json
import os
import subprocess
import tempfile
import time
from dataclasses import asdict, dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, Callable, Optional

from board import bundle_schema as S
from board.errors import InputError, RuntimeUnavailable, SmolVLMError
from board.system_checks import PLATFORM
from host.rkllm_runner import EXIT_NO_TOOLKIT, loaded_examples
from host.toolkit_console import require_conversion_host

ROOT = Path(__file__).resolve().parent.parent
MAX_CONTEXT_LIMIT = 16384  # rkllm-toolkit 1.3.0: at most 16384, a multiple of 32
CONTEXT_ALIGN = 32
TOOLKIT_VERSION = "1.3.0"
VENV = ".venv-rkllm"  # scripts/setup_rkllm_toolkit.sh's default, in the repository
PYTHON_ENV = "SMOLVLM_RKLLM_PYTHON"  # another interpreter for the step (host.convert --rkllm-python)
HEARTBEAT_S = 30
INSTALL_HINT = (
    "rkllm-toolkit is Rockchip's x86_64 Linux wheel, published only in the GitHub repository "
    "airockchip/rknn-llm (release v1.3.0, folder rkllm-toolkit/packages/): take "
    "rkllm_toolkit-1.3.0-cp3XX-cp3XX-linux_x86_64.whl for a Python 3.9-3.12 you have (cp311 for Python 3.11) "
    f"and run `bash scripts/setup_rkllm_toolkit.sh <wheel>`: it makes {VENV}/ with the toolkit's own pins "
    "(torch==2.6.0 as a CPU build, transformers==5.8.0), apart from this venv's torch 2.13. "
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
    optimization_level: int = 0  # rknn-llm benchmark.md: "All models should be converted with optimization_level set to 0"
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


def toolkit_python(explicit: Optional[str | Path] = None) -> Path:
    """The interpreter that runs the toolkit: `explicit`, else $SMOLVLM_RKLLM_PYTHON, else .venv-rkllm's."""
    chosen = explicit or os.environ.get(PYTHON_ENV)
    return Path(chosen).expanduser() if chosen else ROOT / VENV / "bin" / "python"


def runner_env(extra: Optional[dict[str, str]] = None) -> dict[str, str]:
    """The runner's environment: this repository importable (host.rkllm_runner, calibration.holdout)."""
    path = os.environ.get("PYTHONPATH")
    return {**os.environ, "PYTHONPATH": str(ROOT) + (os.pathsep + path if path else ""), "PYTHONUNBUFFERED": "1",
            "TOKENIZERS_PARALLELISM": "false", **(extra or {})}


@lru_cache(maxsize=8)
def _probe(python: str) -> dict[str, Any]:
    try:
        done = subprocess.run([python, "-m", "host.rkllm_runner", "--probe"], capture_output=True, text=True,
                              env=runner_env(), cwd=ROOT, timeout=300)
    except OSError as exc:
        return {"error": f"cannot run {python}: {exc}"}
    except subprocess.TimeoutExpired:
        return {"error": f"{python} -m host.rkllm_runner --probe did not answer in 300 s"}
    try:
        answer = json.loads(done.stdout.strip().splitlines()[-1])
    except (IndexError, json.JSONDecodeError):
        tail = (done.stderr or done.stdout).strip().splitlines()[-1:] or ["no output"]
        return {"error": f"{python} could not run host.rkllm_runner (exit {done.returncode}): {tail[0]}"}
    if done.returncode == EXIT_NO_TOOLKIT and "error" not in answer:
        answer["error"] = "rkllm-toolkit is not importable"
    return answer


def require_rkllm_toolkit(python: Optional[str | Path] = None) -> dict[str, Any]:
    """What the toolkit interpreter runs (host.rkllm_runner --probe), or a RuntimeUnavailable saying how to
    make it: no venv, or a venv without the wheel."""
    require_conversion_host("rkllm-toolkit")
    interpreter = toolkit_python(python)
    if not interpreter.exists():
        where = f"${PYTHON_ENV}" if os.environ.get(PYTHON_ENV) and not python else "--rkllm-python" if python else VENV
        raise RuntimeUnavailable(f"rkllm-toolkit {TOOLKIT_VERSION} has no venv here: {interpreter} ({where}) does not exist",
                                 hint=INSTALL_HINT)
    found = _probe(str(interpreter))
    if "error" in found:
        raise RuntimeUnavailable(f"rkllm-toolkit {TOOLKIT_VERSION} is not installed in {interpreter}: {found['error']}",
                                 hint=INSTALL_HINT)
    return found


def toolkit_version(python: Optional[str | Path] = None) -> Optional[str]:
    """The toolkit version the interpreter runs (None when it has none)."""
    try:
        return require_rkllm_toolkit(python).get("rkllm_toolkit")
    except RuntimeUnavailable:
        return None


# ---------------------------------------------------------------------------------------------
# The build, in the toolkit's venv
# ---------------------------------------------------------------------------------------------


def check_calibration_read(report: dict[str, Any], log_text: str) -> dict[str, Any]:
    """The evidence that the toolkit calibrated on the set it was given, or a DecoderBuildError.

    Evidence, from the toolkit's side: the files of the set it opened during build() (the runner's audit
    hook) and the `Generating train split: N examples` count it printed. A count other than the samples
    given, or neither a count nor an opened file, means it calibrated on something else or on nothing.
    """
    calibration = dict(report.get("calibration") or {})
    given, read = calibration.get("samples"), dict(calibration.get("read_by_toolkit") or {})
    read["log_examples"] = loaded_examples(log_text)
    calibration["read_by_toolkit"] = read
    opened = read.get("sample_files") if calibration.get("layout") == "samples" else int(bool(read.get("file")))
    why = None
    if read["log_examples"] is not None and read["log_examples"] != given:
        why = f"its log says it loaded {read['log_examples']} examples, but the set has {given}"
    elif read["log_examples"] is None and not opened:
        why = "it opened none of the set's files during build() and its log shows no dataset being loaded"
    elif calibration.get("layout") == "samples" and read["log_examples"] is None and opened != given:
        why = f"it opened {opened} of the {given} sample files during build()"
    if why:
        raise DecoderBuildError(
            f"rkllm-toolkit did not calibrate on the calibration set: {why}",
            hint="see the toolkit's log; try the other layout (--decoder-calibration-layout input_embed or samples), "
            "and report the log if it persists",
        )
    return calibration


def build_decoder_rkllm(
    decoder_dir: str | Path,
    dataset: str | Path,
    rkllm_path: str | Path,
    *,
    layout: str = S.CALIBRATION_LAYOUTS[0],
    options: Optional[RKLLMOptions] = None,
    holdout: Optional[str | Path] = None,
    hidden_size: Optional[int] = None,
    python: Optional[str | Path] = None,
    progress: Optional[Callable[[str], None]] = None,
    heartbeat_s: float = HEARTBEAT_S,
) -> dict[str, Any]:
    """Quantize and export the extracted decoder folder in the toolkit's venv (host.rkllm_runner) from the
    calibration `dataset` (the index of the samples layout or the input_embed JSON); measure it on the
    `holdout` .npz (calibration.holdout) when given. Returns the report, also written as
    `<model>.accuracy.json`; the toolkit's output is `<model>.log`."""
    options = options or RKLLMOptions()
    validate_max_context(options.max_context)
    found = require_rkllm_toolkit(python)
    say = progress or (lambda message: None)
    rkllm_path = Path(rkllm_path).resolve()
    rkllm_path.parent.mkdir(parents=True, exist_ok=True)
    stem = rkllm_path.with_suffix("")
    log, report_path = Path(f"{stem}.log"), Path(f"{stem}.accuracy.json")
    job_path, status_path = Path(f"{stem}.job.json"), Path(f"{stem}.status.jsonl")
    rkllm_path.unlink(missing_ok=True)
    for stale in (report_path, status_path):
        stale.unlink(missing_ok=True)
    dataset = Path(dataset).resolve()
    if found.get("standin"):
        say(f"rkllm-toolkit: {found['rkllm_module']} is the tests' STAND-IN, not Rockchip's toolkit")
    elif found.get("rkllm_toolkit") != TOOLKIT_VERSION:
        say(f"warning: {toolkit_python(python)} runs rkllm-toolkit {found.get('rkllm_toolkit')}, not {TOOLKIT_VERSION}")
    with tempfile.TemporaryDirectory(prefix="rkllm-datasets-") as cache:
        job = {"decoder_dir": str(Path(decoder_dir).resolve()), "dataset": str(dataset), "layout": layout,
               "rkllm": str(rkllm_path), "options": asdict(options), "hidden_size": hidden_size,
               "holdout": str(Path(holdout).resolve()) if holdout else None, "report": str(report_path),
               "status": str(status_path)}
        job_path.write_text(json.dumps(job, indent=2) + "\n")
        say(f"rkllm-toolkit {found.get('rkllm_toolkit')} in {toolkit_python(python)}: quantizing "
            f"({options.quantized_dtype}, {options.quantized_algorithm}, optimization_level {options.optimization_level}, "
            f"max_context {options.max_context}); this takes minutes (log: {log})")
        code = _run_runner(toolkit_python(python), job_path, log, status_path, cwd=dataset.parent,
                           env=runner_env({"HF_DATASETS_CACHE": cache}), say=say, heartbeat_s=heartbeat_s)
    try:
        report = json.loads(report_path.read_text())
    except (OSError, json.JSONDecodeError):
        report = {"error": f"the runner ended (exit {code}) without a report"}
    if "error" in report:
        raise DecoderBuildError(report["error"], hint=f"see the toolkit's log: {log}")
    report["calibration"] = check_calibration_read(report, log.read_text(errors="replace"))
    report_path.write_text(json.dumps(report, indent=2) + "\n")
    say(f"rkllm-toolkit: {rkllm_path.name} written ({report['rkllm_mb']} MB, {report['build_s']}s); calibration "
        f"read: {report['calibration']['read_by_toolkit']}")
    accuracy = report.get("accuracy")
    if accuracy and accuracy["measured"]:
        say(f"held-out accuracy ({accuracy['measured']} samples): next-token top-1 agreement mean "
            f"{accuracy['top1_agreement_mean']:.3f} / min {accuracy['top1_agreement_min']:.3f}, KL {accuracy['kl_mean']:.4f}")
    if accuracy and accuracy["not_measured"]:
        say(f"{len(accuracy['not_measured'])} held-out samples not measured: {accuracy['not_measured'][0]['reason']}")
    return report


def _run_runner(python: Path, job: Path, log: Path, status: Path, *, cwd: Path, env: dict[str, str],
                say: Callable[[str], None], heartbeat_s: float) -> int:
    """Start host.rkllm_runner, its output to `log`; a heartbeat with the last phase; Ctrl-C stops it."""
    t0 = time.monotonic()
    with open(log, "w") as out:
        proc = subprocess.Popen([str(python), "-m", "host.rkllm_runner", str(job)], stdout=out,
                                stderr=subprocess.STDOUT, cwd=cwd, env=env)
        try:
            next_beat = heartbeat_s
            while True:
                try:
                    return proc.wait(timeout=1.0)
                except subprocess.TimeoutExpired:
                    pass
                elapsed = time.monotonic() - t0
                if heartbeat_s > 0 and elapsed >= next_beat:
                    next_beat += heartbeat_s
                    say(f"rkllm-toolkit: {_last_phase(status)}: still running ({elapsed:.0f}s)")
        except BaseException:  # Ctrl-C (the runner got it too) or anything else: no orphan left behind
            proc.terminate()
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            raise


def _last_phase(status: Path) -> str:
    try:
        lines = status.read_text().strip().splitlines()
        return json.loads(lines[-1])["phase"] if lines else "starting"
    except (OSError, json.JSONDecodeError, KeyError):
        return "starting"
