"""Build `vision.rknn` for the RK3588 from the exported vision ONNX, and prove it in the simulator.

What a build does, in order (all in-process: the toolkit's simulator only runs a model the same RKNN
object has just built, never one loaded from disk):
1. config: target rk3588; for layouts that take pixels, the checkpoint's image_mean/image_std (scaled to
   the 0..255 input) are baked in, so the board feeds the uint8 NHWC RGB tiles its front end produces;
2. fp16: `build(do_quantization=False)`. int8 (`w8a8`), by default: calibration on the dataset
   (hybrid step 1), then the model's output tail is kept in float16 so the model outputs float
   features (no int8 requantization, no dequantization on the board), plus any sensitive tensors
   chosen by hand or by the toolkit's hybrid proposal (hybrid step 2). With int8 outputs requested,
   or the toolkit's `auto_hybrid`, it is the plain `build()` (faster; outputs int8, which the
   runtime dequantizes);
3. export; optional per-layer `accuracy_analysis` (in a temp dir, removed after);
4. the accuracy check: simulator vs PyTorch on held-out tiles, written as JSON next to the model; a
   result below the threshold raises VisionAccuracyError (the CLI exits non-zero);
5. the compiler's per-op table (printed during a verbose build) parsed into `<model>.ops.json`:
   estimated cycles per tile, ops that fall back to the CPU, the most expensive ops.

rknn-toolkit2 prints a lot on stdout/stderr, from Python and from native code; everything it prints
goes to `<model>.log` next to the model (file-descriptor redirection), and the console gets short
progress lines with elapsed time instead.

    python -m host.vision_rknn --model HuggingFaceTB/SmolVLM-256M-Instruct --out out/vision --dtype int8
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import re
import shutil
import sys
import tempfile
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np

from board.errors import InputError, RuntimeUnavailable, SmolVLMError
from board.system_checks import PLATFORM
from board.tiles import SplitSettings, normalization
from board.vision import DEFAULT_MIN_COSINE
from host.toolkit_console import heartbeat, require_conversion_host, toolkit_output
from host.vision_export import DEFAULT_LAYOUT, LAYOUTS, agreement

TARGET_PLATFORM = PLATFORM
QUANTIZED_ALGORITHMS = ("normal", "kl_divergence", "mmse")  # mmse: ~22 min on 2 cores for SigLIP-B; never a default
QUANTIZED_METHODS = ("channel", "layer")
HYBRID_MODES = ("off", "proposal", "auto")
# Ops that only move data; the output tail walked back through them ends at the last computing op.
_SHAPE_OPS = {"Reshape", "Transpose", "exDataConvert", "Squeeze", "Unsqueeze", "Flatten", "Identity"}
_INSTALL_HINT = (
    "install it on an x86_64 Linux host with scripts/setup.sh, or: pip install --no-deps rknn-toolkit2==2.5.0 "
    '"numpy<=1.26.4" "onnx>=1.16.1,<=1.18.0" "protobuf<=4.25.4" psutil ruamel.yaml scipy tqdm '
    '"opencv-python<4.12" fast-histogram onnxruntime "setuptools<81"'
)


class VisionBuildError(SmolVLMError):
    """rknn-toolkit2 refused a step (config, load, build, export, runtime); the log says why."""


class VisionAccuracyError(SmolVLMError):
    """The built model does not compute what the reference computes, within the threshold."""


@dataclass
class QuantOptions:
    """The int8 knobs that matter; defaults chosen by measurement (see docs in the closing report)."""

    algorithm: str = "normal"
    method: str = "channel"
    hybrid: str = "off"
    fp16_tensors: tuple[str, ...] = ()  # tensor names (from the toolkit's .quantization.cfg) kept in float16
    float_outputs: bool = True
    auto_hybrid_cos_thresh: float = 0.98
    proposal_samples: int = 1

    @property
    def hybrid_steps(self) -> bool:
        """True: calibrate and build through hybrid_quantization_step1/2 (needed for float outputs and
        chosen float16 tensors); False: the toolkit's plain build(), faster, int8 outputs."""
        return self.hybrid == "proposal" or (self.hybrid == "off" and (self.float_outputs or bool(self.fp16_tensors)))

    def validate(self) -> None:
        if self.algorithm not in QUANTIZED_ALGORITHMS:
            raise InputError(f"quantized algorithm '{self.algorithm}' is not one of {QUANTIZED_ALGORITHMS}")
        if self.method not in QUANTIZED_METHODS:
            raise InputError(f"quantized method '{self.method}' is not one of {QUANTIZED_METHODS}")
        if self.hybrid not in HYBRID_MODES:
            raise InputError(f"hybrid mode '{self.hybrid}' is not one of {HYBRID_MODES}")
        if self.hybrid == "auto" and self.fp16_tensors:
            raise InputError("hybrid 'auto' picks its own float16 layers; drop the explicit fp16 tensors or use 'off'")


@dataclass
class BuildOptions:
    dtype: str = "fp16"
    quant: QuantOptions = field(default_factory=QuantOptions)
    min_cosine: float | None = None  # None: DEFAULT_MIN_COSINE[dtype]
    accuracy_analysis: bool = False
    optimization_level: int = 3
    target_platform: str = TARGET_PLATFORM

    @property
    def threshold(self) -> float:
        return DEFAULT_MIN_COSINE[self.dtype] if self.min_cosine is None else self.min_cosine

    def validate(self) -> None:
        if self.dtype not in DEFAULT_MIN_COSINE:
            raise InputError(f"dtype '{self.dtype}' is not one of {tuple(DEFAULT_MIN_COSINE)}")
        if self.dtype == "int8":
            self.quant.validate()


def require_rknn_toolkit() -> type:
    """The RKNN class, or a RuntimeUnavailable that says what to do."""
    require_conversion_host("rknn-toolkit2")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # its pkg_resources deprecation warning
            from rknn.api import RKNN
    except ImportError as exc:
        raise RuntimeUnavailable(f"rknn-toolkit2 cannot be imported ({exc})", hint=_INSTALL_HINT) from exc
    return RKNN


class Progress:
    """Short progress lines with elapsed time on the real stderr, even while the toolkit's output is redirected."""

    def __init__(self, stream_fd: int | None = None, heartbeat_s: float = 20.0, enabled: bool = True):
        self.fd = stream_fd
        self.heartbeat_s = heartbeat_s
        self.enabled = enabled
        self.start = time.monotonic()

    def say(self, message: str) -> None:
        if not self.enabled:
            return
        line = f"[vision {time.monotonic() - self.start:6.1f}s] {message}\n"
        if self.fd is None:
            sys.stderr.write(line)
            sys.stderr.flush()
        else:
            os.write(self.fd, line.encode())

    @contextlib.contextmanager
    def step(self, what: str, log_path: Path) -> Iterator[None]:
        """Run a toolkit step with its output appended to log_path and a heartbeat on the console."""
        self.say(f"{what} ...")
        t0 = time.monotonic()
        with toolkit_output(log_path, what) as saved_err:
            previous, self.fd = self.fd, saved_err
            try:
                with heartbeat(saved_err, "vision", what, int(self.heartbeat_s) if self.enabled else 0,
                               since_s=int(t0 - self.start)):
                    yield
            finally:
                self.fd = previous
        self.say(f"{what} done ({time.monotonic() - t0:.1f}s)")


def _check(ret: Any, what: str, log_path: Path) -> None:
    if ret != 0:
        raise VisionBuildError(f"rknn-toolkit2 {what} failed (returned {ret})", hint=f"see the toolkit's log: {log_path}")


# ---------------------------------------------------------------------------------------------
# The compiler's op table
# ---------------------------------------------------------------------------------------------

_LOG_PREFIX = re.compile(r"^.*?RKNN: \[[0-9:.]+\] ?")
_ANSI = re.compile(r"\x1b\[[0-9;]*m")
_OP_ROW = re.compile(
    r"^(?P<id>\d+)\s+(?P<op>\S+)\s+(?P<dtype>\S+)\s+(?P<target>NPU|CPU|GPU)\s+(?P<inputs>\S+)\s+(?P<outputs>\S+)\s+"
    r"(?P<ddr>\d+)/(?P<npu>\d+)/(?P<total>\d+)\s+(?P<rw_kb>\S+)\s+(?P<name>\S.*?)\s*$"
)
_IO_OPS = {"InputOperator", "OutputOperator"}


def parse_op_table(log_text: str) -> list[dict[str, Any]]:
    """The rows of the last 'Network Layer Information Table' a verbose build printed."""
    tables: list[list[dict[str, Any]]] = []
    current: list[dict[str, Any]] | None = None
    for raw in log_text.splitlines():
        line = _LOG_PREFIX.sub("", _ANSI.sub("", raw)).strip()
        if "Network Layer Information Table" in line:
            current = []
            tables.append(current)
            continue
        if current is None:
            continue
        match = _OP_ROW.match(line)
        if match:
            row = match.groupdict()
            current.append({
                "id": int(row["id"]), "op": row["op"], "dtype": row["dtype"], "target": row["target"],
                "input_shapes": row["inputs"], "output_shape": row["outputs"],
                "cycles_ddr": int(row["ddr"]), "cycles_npu": int(row["npu"]), "cycles_total": int(row["total"]),
                "rw_kb": float(row["rw_kb"]) if row["rw_kb"].replace(".", "", 1).isdigit() else None,
                "name": row["name"],
            })
        elif current and line.startswith("---"):
            current = None  # the table's closing rule
    return tables[-1] if tables else []


def summarize_ops(ops: list[dict[str, Any]], top: int = 5) -> dict[str, Any]:
    """Estimated cycles per tile, CPU fallbacks (input/output operators aside), the most expensive ops.

    The estimate is the compiler's own and counts only Conv-class ops (MatMuls become 1x1 Convs):
    fused attention (exSDPAttention), exNorm, exGelu, Add, Split, Reshape and Transpose all report 0,
    listed under `zero_cycle_ops`. So it is a proxy for comparing exports of the same model (the
    attention's QK^T and AV products, ~18% of SigLIP-B/16@512's MACs, are missing from every
    figure), not a latency.
    """
    compute = [op for op in ops if op["op"] not in _IO_OPS]
    by_type: dict[str, int] = {}
    zero: dict[str, int] = {}
    for op in compute:
        by_type[op["op"]] = by_type.get(op["op"], 0) + op["cycles_total"]
        if op["cycles_total"] == 0:
            zero[op["op"]] = zero.get(op["op"], 0) + 1
    return {
        "est_cycles_per_tile": sum(op["cycles_total"] for op in compute),
        "est_cycles_ddr": sum(op["cycles_ddr"] for op in compute),
        "est_cycles_npu": sum(op["cycles_npu"] for op in compute),
        "n_ops": len(compute),
        "cpu_ops": [{"id": op["id"], "op": op["op"], "name": op["name"]} for op in compute if op["target"] != "NPU"],
        "top_ops": [
            {k: op[k] for k in ("id", "op", "name", "cycles_total", "output_shape")}
            for op in sorted(compute, key=lambda o: o["cycles_total"], reverse=True)[:top]
        ],
        "cycles_by_op_type": dict(sorted(by_type.items(), key=lambda kv: kv[1], reverse=True)),
        "zero_cycle_ops": dict(sorted(zero.items())),
    }


NPU_HZ = 1e9  # the RK3588 NPU's top clock
NPU_CORES = 3
EST_IMAGE_FORMULA = "ceil(tiles / 3) * est_cycles_per_tile / 1e9 s: one single-core runtime per NPU core, 1 GHz"


def est_image_ms(cycles_per_tile: int, tiles: int = 17) -> float:
    """A fully split image's encode time from the estimate: tiles spread over one runtime per NPU core
    (board.vision's 'parallel' mode), each core running a whole tile at NPU_HZ (EST_IMAGE_FORMULA)."""
    return round(math.ceil(tiles / NPU_CORES) * cycles_per_tile / NPU_HZ * 1e3, 1)


# ---------------------------------------------------------------------------------------------
# int8 through hybrid quantization steps 1/2 (float outputs, chosen float16 tensors)
# ---------------------------------------------------------------------------------------------


def output_tail_tensors(model_path: Path) -> list[str]:
    """Tensors from the last computing op to the graph output, in the toolkit's intermediate model.

    Keeping these in float16 makes the model's output float: the last projection is computed and
    returned without an int8 requantization of the features.
    """
    import onnx

    graph = onnx.load(str(model_path), load_external_data=False).graph
    producer = {out: node for node in graph.node for out in node.output}
    tail: list[str] = []
    for output in graph.output:
        node = producer.get(output.name)
        while node is not None:
            tail += [t for t in node.output if t != output.name]
            if node.op_type not in _SHAPE_OPS or not node.input:
                break
            node = producer.get(node.input[0])
    return tail


def _edit_quant_cfg(cfg_path: Path, extra_fp16: Sequence[str]) -> list[str]:
    """Merge tensors into the cfg's custom_quantize_layers (kept: the toolkit's own proposal); return the set."""
    from ruamel.yaml import YAML

    text = cfg_path.read_text()
    head, sep, rest = text.partition("\nquantize_parameters:")
    if not sep:
        raise VisionBuildError(f"unexpected quantization config layout in {cfg_path}")
    yaml = YAML(typ="safe")
    custom = (yaml.load(head) or {}).get("custom_quantize_layers") or {}
    params = yaml.load("quantize_parameters:" + rest)["quantize_parameters"]
    unknown = [t for t in extra_fp16 if t not in params]
    if unknown:
        raise InputError(
            f"not tensors of this model's quantization config: {', '.join(unknown)}",
            hint="tensor names are the keys under quantize_parameters in a toolkit .quantization.cfg",
        )
    for name in extra_fp16:
        custom[name] = "float16"
    lines = ["custom_quantize_layers:" + ("" if custom else " {}")]
    lines += [f"    {json.dumps(name)}: {dtype}" for name, dtype in custom.items()]
    cfg_path.write_text("\n".join(lines) + "\nquantize_parameters:" + rest)
    return sorted(custom)


@contextlib.contextmanager
def _chdir(path: Path) -> Iterator[None]:
    """The toolkit writes its intermediate files (check*.onnx, hybrid step 1's) into the current directory."""
    previous = Path.cwd()
    os.chdir(path)
    try:
        yield
    finally:
        os.chdir(previous)


def _quantize_hybrid(rknn: Any, onnx_path: Path, dataset: Path, quant: QuantOptions, work: Path, log: Path,
                     progress: Progress) -> tuple[Any, list[str]]:
    """Step 1 (calibration) on `rknn`, the cfg edit, step 2 on a fresh RKNN object (step 2 refuses an
    object that loaded a model); returns that object, ready for export and the simulator."""
    stem = onnx_path.stem
    with progress.step("int8 calibration (hybrid step 1)", log), _chdir(work):
        _check(rknn.hybrid_quantization_step1(
            dataset=str(dataset), proposal=quant.hybrid == "proposal", proposal_dataset_size=quant.proposal_samples,
        ), "hybrid_quantization_step1", log)
        rknn.release()
    model, data, cfg = (work / f"{stem}{suffix}" for suffix in (".model", ".data", ".quantization.cfg"))
    fp16 = list(quant.fp16_tensors) + (output_tail_tensors(model) if quant.float_outputs else [])
    kept = _edit_quant_cfg(cfg, fp16)
    with progress.step(f"int8 build (hybrid step 2, {len(kept)} tensors kept float16)", log):
        rknn = type(rknn)(verbose=True)
        _check(rknn.hybrid_quantization_step2(
            model_input=str(model), data_input=str(data), model_quantization_cfg=str(cfg),
        ), "hybrid_quantization_step2", log)
    return rknn, kept


# ---------------------------------------------------------------------------------------------
# The build
# ---------------------------------------------------------------------------------------------


def rknn_norm_values(settings: SplitSettings) -> tuple[list[list[float]], list[list[float]]]:
    """mean_values/std_values on the 0..255 input, from the board's normalization v * scale + offset
    (board.tiles.normalization): the toolkit computes (v - mean_value) / std_value, so
    mean_value = -offset / scale (= mean / rescale) and std_value = 1 / scale (= std / rescale)."""
    scale, offset = normalization(settings)
    return [[float(v) for v in -offset / scale]], [[float(v) for v in 1 / scale]]


@dataclass(frozen=True)
class _BuildFiles:
    """What a build writes next to `<model>.rknn`: the toolkit's log and the two JSON reports."""

    rknn: Path
    log: Path
    accuracy: Path
    ops: Path

    @classmethod
    def beside(cls, rknn_path: Path) -> "_BuildFiles":
        stem = rknn_path.with_suffix("")
        return cls(rknn_path, *(Path(f"{stem}{s}") for s in (".log", ".accuracy.json", ".ops.json")))


def _load_onnx(RKNN: type, onnx_path: Path, layout: Any, settings: SplitSettings, options: BuildOptions,
               log: Path, progress: Progress) -> Any:
    """A verbose RKNN object configured for the target (mean/std baked in where the layout takes pixels,
    the int8 knobs) with the ONNX graph loaded."""
    quant = options.quant
    with progress.step("loading the ONNX graph", log):
        rknn = RKNN(verbose=True)  # verbose: the build prints the op table parse_op_table reads
        config: dict[str, Any] = {"target_platform": options.target_platform,
                                  "optimization_level": options.optimization_level}
        if layout.rknn_normalizes:
            config["mean_values"], config["std_values"] = rknn_norm_values(settings)
        if options.dtype == "int8":
            config.update(quantized_dtype="w8a8", quantized_algorithm=quant.algorithm,
                          quantized_method=quant.method, auto_hybrid_cos_thresh=quant.auto_hybrid_cos_thresh)
        _check(rknn.config(**config), "config", log)
        _check(rknn.load_onnx(model=str(onnx_path)), f"load_onnx({onnx_path})", log)
    return rknn


def _build(rknn: Any, onnx_path: Path, dataset: Path | None, options: BuildOptions, work: Path, log: Path,
           progress: Progress) -> tuple[Any, dict[str, Any]]:
    """fp16, plain int8 or int8 through the hybrid steps; returns the built RKNN object (the hybrid
    path makes a new one) and what the report records about the quantization."""
    quant = options.quant
    if options.dtype == "fp16":
        with progress.step("fp16 build", log):
            _check(rknn.build(do_quantization=False), "build", log)
        return rknn, {}
    if not quant.hybrid_steps:
        auto = quant.hybrid == "auto"
        with progress.step(f"int8 build ({quant.algorithm}/{quant.method}{', auto_hybrid' if auto else ''})", log):
            _check(rknn.build(do_quantization=True, dataset=str(dataset), auto_hybrid=auto), "build", log)
        return rknn, {"float16_tensors": "auto" if auto else [], "float_outputs": False}
    rknn, kept = _quantize_hybrid(rknn, onnx_path, Path(dataset), quant, work, log, progress)
    return rknn, {"float16_tensors": kept, "float_outputs": quant.float_outputs}


def _simulate(rknn: Any, layout: Any, tiles: np.ndarray, row_shape: tuple[int, ...], log: Path,
              progress: Progress) -> tuple[np.ndarray, float]:
    """The built model in the toolkit's simulator on uint8 NHWC tiles, each fed as the board feeds it;
    returns the features [n, *row_shape] and the seconds per tile."""
    with progress.step(f"simulator accuracy check on {len(tiles)} held-out tiles", log):
        _check(rknn.init_runtime(), "init_runtime (simulator)", log)
        kwargs = {"data_format": [layout.rknn_data_format]} if layout.rknn_data_format else {}
        t0 = time.monotonic()
        outputs = []
        for tile in tiles:
            result = rknn.inference(inputs=[layout.rknn_input(tile)], **kwargs)
            if result is None:
                raise VisionBuildError("rknn-toolkit2 simulator inference failed", hint=f"see {log}")
            outputs.append(np.asarray(result[0], np.float32).reshape(row_shape))
        return np.stack(outputs), (time.monotonic() - t0) / len(tiles)


def _op_summary(files: _BuildFiles, build_log_bytes: int) -> dict[str, Any]:
    """The op table of the build's part of the log, written to `<model>.ops.json`; returns its summary."""
    ops = parse_op_table(files.log.read_bytes()[:build_log_bytes].decode(errors="replace"))
    summary = summarize_ops(ops)
    files.ops.write_text(json.dumps({**summary, "ops": ops}, indent=2) + "\n")
    return summary


def _judge(outputs: np.ndarray, reference: np.ndarray, sim_s: float, threshold: float) -> dict[str, Any]:
    """The simulator's features against the reference (host.vision_export.agreement), and the verdict."""
    accuracy = agreement(outputs, reference)
    accuracy.update(threshold=threshold, passed=accuracy["cosine_min"] >= threshold, simulator_s_per_tile=round(sim_s, 2))
    return accuracy


def build_vision_rknn(
    onnx_path: str | Path,
    rknn_path: str | Path,
    *,
    layout: Any,
    settings: SplitSettings,
    holdout_tiles: np.ndarray,
    reference: np.ndarray,
    dataset: str | Path | None = None,
    options: BuildOptions | None = None,
    progress: Progress | None = None,
    provenance: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Build, export, check accuracy and account cycles; return the report (also written as JSON).

    holdout_tiles: uint8 NHWC [n, T, T, 3] tiles never used for calibration; reference: the PyTorch
    features for them; provenance: what the tiles were cut from, recorded in the JSON.
    Raises VisionAccuracyError (after writing the JSON) below the threshold.
    """
    options = options or BuildOptions()
    options.validate()
    if options.dtype == "int8" and dataset is None:
        raise InputError("an int8 build needs a calibration dataset (dataset.txt of .npy tiles)")
    RKNN = require_rknn_toolkit()
    progress = progress or Progress()
    onnx_path = Path(onnx_path).resolve()
    dataset = Path(dataset).resolve() if dataset is not None else None
    files = _BuildFiles.beside(Path(rknn_path).resolve())
    files.rknn.parent.mkdir(parents=True, exist_ok=True)
    log = files.log
    log.write_text("")
    report: dict[str, Any] = {
        "model": files.rknn.name, "dtype": options.dtype, "layout": layout.manifest_name,
        "target_platform": options.target_platform,
        "quantization": asdict(options.quant) if options.dtype == "int8" else None,
        **(provenance or {}),
    }
    t_build = time.monotonic()
    rknn = None
    # the toolkit writes check*.onnx files into the current directory: keep them in the temp dir
    with tempfile.TemporaryDirectory(prefix="vision-rknn-") as tmp, _chdir(Path(tmp)):
        try:
            rknn = _load_onnx(RKNN, onnx_path, layout, settings, options, log, progress)
            rknn, quantized = _build(rknn, onnx_path, dataset, options, Path(tmp), log, progress)
            report.update(quantized)
            with progress.step("export", log):
                _check(rknn.export_rknn(str(files.rknn)), "export_rknn", log)
            build_log_bytes = log.stat().st_size  # the op table to parse is the build's, not a later step's
            report["build_s"] = round(time.monotonic() - t_build, 1)
            report["rknn_mb"] = round(files.rknn.stat().st_size / 1e6, 1)
            if options.accuracy_analysis:
                report["accuracy_analysis"] = _accuracy_analysis(rknn, layout, holdout_tiles[:1],
                                                                 files.rknn.with_suffix(""), Path(tmp), log, progress)
            outputs, sim_s = _simulate(rknn, layout, holdout_tiles, reference.shape[1:], log, progress)
        finally:
            if rknn is not None:
                with toolkit_output(log, "release"):
                    rknn.release()

    report["accuracy"] = _judge(outputs, reference, sim_s, options.threshold)
    files.accuracy.write_text(json.dumps(report, indent=2) + "\n")
    report["ops"] = summary = _op_summary(files, build_log_bytes)
    accuracy = report["accuracy"]
    progress.say(
        f"{files.rknn.name}: cosine min {accuracy['cosine_min']:.5f} / mean {accuracy['cosine_mean']:.5f}, "
        f"max abs err {accuracy['max_abs_err']:.4g}; est. {summary['est_cycles_per_tile'] / 1e6:.1f} M cycles/tile, "
        f"{len(summary['cpu_ops'])} CPU ops"
    )
    if not accuracy["passed"]:
        raise VisionAccuracyError(
            f"{files.rknn.name} ({options.dtype}): simulator cosine min {accuracy['cosine_min']:.5f} on "
            f"{accuracy['tiles']} held-out tiles is below the threshold {options.threshold}",
            hint=f"details in {files.accuracy}; for int8 try a hybrid mode (proposal/auto), float16 tensors, the "
                 "kl_divergence algorithm, or the per-layer accuracy analysis to see which layers lose precision "
                 "(the build flags in --help)",
        )
    return report


def _accuracy_analysis(rknn: Any, layout: Any, tiles: np.ndarray, stem: Path, tmp: Path, log: Path,
                       progress: Progress) -> str:
    """rknn-toolkit2's per-layer comparison (float vs quantized), its text kept next to the model.

    The per-layer dumps are large (~5.6 GB for SigLIP-B/16@512): they live in a temp dir only.
    """
    inputs = []
    for i, tile in enumerate(tiles):
        path = tmp / f"analysis_{i}.npy"
        np.save(path, layout.calibration_array(tile))
        inputs.append(str(path))
    out_dir = tmp / "analysis"
    with progress.step("rknn-toolkit2 accuracy_analysis (per layer)", log):
        _check(rknn.accuracy_analysis(inputs=inputs, output_dir=str(out_dir)), "accuracy_analysis", log)
    target = Path(f"{stem}.error_analysis.txt")
    shutil.copyfile(out_dir / "error_analysis.txt", target)
    shutil.rmtree(out_dir, ignore_errors=True)
    return target.name


# ---------------------------------------------------------------------------------------------
# From a checkpoint to a checked vision.rknn
# ---------------------------------------------------------------------------------------------


def convert_vision(
    tower: Any,
    settings: SplitSettings,
    out_dir: str | Path,
    options: BuildOptions | None = None,
    *,
    calibration_images: Sequence[Path] | None = None,
    holdout_images: Sequence[Path] | None = None,
    calibration_per_image: int = 2,
    holdout_tiles: int = 8,
    name: str = "vision",
    progress: Progress | None = None,
    opset: int | None = None,
) -> dict[str, Any]:
    """Export the tower to ONNX (checked in ONNX Runtime), cut calibration and hold-out tiles with the
    board's splitter, build `<name>.rknn` and check it. Defaults: the shipped image sets, DEFAULT_OPSET."""
    from calibration.vision_tiles import cut_tiles, default_images, write_dataset
    from host.vision_export import DEFAULT_OPSET, export_onnx, reference_features, validate_onnx

    options = options or BuildOptions()
    options.validate()
    require_rknn_toolkit()
    progress = progress or Progress()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if settings.tile != tower.geometry.tile:
        raise InputError(f"splitting tile {settings.tile} != vision tower tile {tower.geometry.tile}")

    holdout_images = holdout_images or default_images("holdout")
    holdout = cut_tiles(holdout_images, settings, per_image=-(-holdout_tiles // len(holdout_images)), limit=holdout_tiles)
    progress.say(f"{len(holdout)} held-out tiles; PyTorch reference features ...")
    reference = reference_features(tower, holdout, settings)
    onnx_path = out / f"{name}.onnx"
    progress.say(f"exporting {onnx_path.name} (layout {tower.layout.manifest_name}) ...")
    export_onnx(tower, onnx_path, opset or DEFAULT_OPSET)
    onnx_check = validate_onnx(tower, onnx_path, holdout[:2], settings)
    progress.say(f"ONNX Runtime vs PyTorch: cosine min {onnx_check['cosine_min']:.6f}, max abs {onnx_check['max_abs_err']:.3g}")
    if onnx_check["cosine_min"] < 0.9999:
        raise VisionBuildError(f"the exported ONNX disagrees with PyTorch: {onnx_check}")

    used = holdout_images[:holdout_tiles]  # tiles interleave across images, so a short limit uses the first ones
    provenance: dict[str, Any] = {"holdout": {"images": [p.name for p in used], "tiles": len(holdout)}}
    with tempfile.TemporaryDirectory(prefix="vision-calib-") as tmp:
        dataset = None
        if options.dtype == "int8":
            calibration_images = calibration_images or default_images("calibration")
            calib = cut_tiles(calibration_images, settings, calibration_per_image)
            dataset = write_dataset(calib, tower.layout.calibration_array, tmp)
            provenance["calibration"] = {"images": [p.name for p in calibration_images], "tiles": len(calib)}
            progress.say(f"{len(calib)} calibration tiles written")
        report = build_vision_rknn(
            onnx_path, out / f"{name}.rknn", layout=tower.layout, settings=settings, holdout_tiles=holdout,
            reference=reference, dataset=dataset, options=options, progress=progress, provenance=provenance,
        )
    report["onnx_check"] = onnx_check
    report["geometry"] = asdict(tower.geometry)
    report["graph_forms"] = asdict(tower.forms)
    report["opset"] = opset or DEFAULT_OPSET
    return report


def add_build_arguments(parser: Any, prefix: str = "") -> None:
    """The vision build's flags, defined once: this CLI and scripts/bench_vision.py add them as they are
    (--dtype, --layout, ...), host.convert with prefix 'vision-' (--vision-dtype, --vision-layout, ...).
    `parser` is a parser or an argument group; the defaults are BuildOptions' and QuantOptions'."""
    build, quant = BuildOptions(), QuantOptions()

    def add(flag: str, **kwargs: Any) -> None:
        parser.add_argument(f"--{prefix}{flag}", **kwargs)

    add("layout", choices=tuple(LAYOUTS), default=DEFAULT_LAYOUT,
        help="how the board hands a tile to the NPU: 'patches' (its patch rows into a MatMul, the normalization "
             "folded into the weights) or 'conv' (the tile into transformers' patch Conv, as Rockchip's demo); "
             "recorded in the manifest (docs/vision_variants.md)")
    add("dtype", choices=tuple(DEFAULT_MIN_COSINE), default=build.dtype,
        help="float16, or int8 (w8a8) calibrated on tiles of the calibration images")
    add("algorithm", choices=QUANTIZED_ALGORITHMS, default=quant.algorithm,
        help="int8 calibration algorithm (mmse is very slow: ~22 min for SigLIP-B on 2 cores)")
    add("quant-method", choices=QUANTIZED_METHODS, default=quant.method,
        help="int8 weight scales per output channel or per layer")
    add("hybrid", choices=HYBRID_MODES, default=quant.hybrid,
        help="int8: keep sensitive layers in float16: 'proposal' (the toolkit's proposal, float outputs kept) "
             "or 'auto' (the toolkit's auto_hybrid build; outputs stay int8)")
    add("fp16-tensor", action="append", default=list(quant.fp16_tensors), metavar="NAME",
        help="int8: a tensor to keep in float16 (names from the toolkit's .quantization.cfg); repeatable")
    add("int8-outputs", action="store_true", default=not quant.float_outputs,
        help="int8 model outputs int8 (the runtime dequantizes): the plain, faster build path")
    add("auto-hybrid-cos-thresh", type=float, default=quant.auto_hybrid_cos_thresh,
        help=f"with --{prefix}hybrid auto: the toolkit keeps layers below this cosine in float16")
    add("min-cosine", type=float, default=build.min_cosine,
        help="fail when the simulator's cosine vs PyTorch on held-out tiles is below this (default "
             + ", ".join(f"{v} {k}" for k, v in DEFAULT_MIN_COSINE.items()) + ")")
    add("accuracy-analysis", action="store_true", default=build.accuracy_analysis,
        help="also run rknn-toolkit2's per-layer accuracy_analysis (slow, GBs of temp files)")


def options_from_args(args: argparse.Namespace, prefix: str = "") -> BuildOptions:
    """The validated BuildOptions from the flags of add_build_arguments (same prefix); the layout is
    args.<prefix>layout, a property of the exported graph rather than of the build."""
    def get(flag: str) -> Any:
        return getattr(args, (prefix + flag).replace("-", "_"))

    options = BuildOptions(
        dtype=get("dtype"),
        quant=QuantOptions(algorithm=get("algorithm"), method=get("quant-method"), hybrid=get("hybrid"),
                           fp16_tensors=tuple(get("fp16-tensor")), float_outputs=not get("int8-outputs"),
                           auto_hybrid_cos_thresh=get("auto-hybrid-cos-thresh")),
        min_cosine=get("min-cosine"),
        accuracy_analysis=get("accuracy-analysis"),
    )
    options.validate()
    return options


def main(argv: Sequence[str] | None = None) -> int:
    from calibration.vision_tiles import find_images
    from host.checkpoint import load_checkpoint
    from host.vision_export import load_vision_tower

    parser = argparse.ArgumentParser(description="Convert a SmolVLM vision tower + connector to RKNN for the RK3588.")
    parser.add_argument("--model", required=True, help="Hugging Face id or checkpoint folder")
    parser.add_argument("--out", required=True, help="output folder (vision.onnx, vision.rknn, its JSON reports and log)")
    parser.add_argument("--calibration", nargs="+", help="calibration images or folders (default: the shipped set)")
    parser.add_argument("--holdout", nargs="+", help="held-out images or folders (default: the shipped set)")
    parser.add_argument("--calibration-per-image", type=int, default=2)
    parser.add_argument("--holdout-tiles", type=int, default=8)
    add_build_arguments(parser)
    args = parser.parse_args(argv)
    try:
        options = options_from_args(args)
        require_rknn_toolkit()
        checkpoint = load_checkpoint(args.model)
        settings = SplitSettings.from_preprocessor(checkpoint.preprocessor)
        tower = load_vision_tower(checkpoint, layout=args.layout)
        report = convert_vision(
            tower, settings, args.out, options,
            calibration_images=find_images(args.calibration) if args.calibration else None,
            holdout_images=find_images(args.holdout) if args.holdout else None,
            calibration_per_image=args.calibration_per_image, holdout_tiles=args.holdout_tiles,
        )
    except SmolVLMError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(json.dumps({k: report[k] for k in ("model", "dtype", "rknn_mb", "build_s", "accuracy")}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
