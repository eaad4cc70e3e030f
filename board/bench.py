"""`python board/bench.py`: one JSON object of latency figures for a bundle on an RK3588 board.

    python board/bench.py --bundle ~/smolvlm-256m --json                 # on the board (NPU)
    python board/bench.py --bundle out/bundle --emulate --json --runs 1  # x86: same shape, not board numbers

The workload is fixed so that runs, boards and versions can be compared (override with --image/--prompt):

1. image request: a synthetic 2048x2048 PNG (smooth colour fields + noise, seed 0, so tiles differ;
   it splits into 4x4 tiles + the global view = 17 tiles for every SmolVLM family), the question
   DEFAULT_PROMPT, greedy decoding, at most --new-tokens (64) new tokens, vision cache cleared each
   run. Gives the image encode time (PNG decode + split + vision), time to first token (image
   included), prefill tok/s (~1.1k prompt tokens for 256M/500M) and decode tok/s.
2. text-128 request: 128 text tokens fed straight to the decoder, then up to --new-tokens greedy
   tokens: Rockchip's own benchmark setup (seqlen 128, 64 new tokens), to compare with its figures.
3. vision modes: the workload's tiles through a fresh encoder in each NPU core mode (single = core
   0, parallel = one runtime per core, all = one runtime over the three cores), opened one at a time
   after the pipeline is closed, so peak RSS (read during 1-2) is the serving process's.

`frontend_alone_ms` is the workload image's decode + split on their own (no vision), for the share of
`image_encode_ms` the front end would cost if nothing overlapped it: the pipeline hands every tile
to the NPU as soon as it is cut (board.pipeline), so `image_encode_ms` is less than their sum.

Every figure is the median, min and max over --runs runs (after --warmup unmeasured runs). A
decoder may stop before --new-tokens on its end-of-turn token: `decode_tokens` says how many it
made. "backend" is "npu" on the board and "emulate" with --emulate (ONNX Runtime + PyTorch on the
bundle's host/ files): emulation numbers describe the x86 machine, never the board.

`--emulate --simulate-npu-ms MS` replaces the vision backend by a scheduling model of the NPU
(SimulatedNPU: three cores, MS per tile each; the rows are still the emulation's) to measure how much
of the front end hides behind the NPU off the board. The JSON's `simulated_npu` section has
`npu_alone_ms` (the model on ready-cut tiles) and `hidden_fraction` = (npu_alone_ms + frontend_alone_ms
- image_encode_ms) / frontend_alone_ms, from the medians. A scheduling model, not a board figure: the
real per-tile time, the NPU's memory traffic and rknnlite's CPU work are not in it, and the x86 CPU
stands in for the A76 cores.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import statistics
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

if __package__ in (None, ""):  # run as a script (python board/bench.py): board/_script_path.py fixes sys.path
    import runpy

    runpy.run_path(str(Path(__file__).with_name("_script_path.py")))

import numpy as np  # noqa: E402

from board import __version__  # noqa: E402
from board import bundle_schema as S  # noqa: E402
from board.errors import InputError, SmolVLMError  # noqa: E402
from board.system_checks import SystemPaths, package_version, parse_version, read_npu_driver_version  # noqa: E402
from board.vision import NPU_CORE_MODES, VisionEncoder  # noqa: E402

SCHEMA = "smolvlm-rk3588-bench/1"
# Per-stage latency budgets for known models (Rockchip's figures + headroom), shipped with the package.
BUDGETS_FILE = Path(__file__).with_name("rk3588_budgets.json")
DEFAULT_PROMPT = "Describe this image in detail."
DEFAULT_IMAGE_SIDE = 2048
DEFAULT_NEW_TOKENS = 64
TEXT_TOKENS = 128
EMULATION_WARNING = ("x86 emulation (ONNX Runtime + PyTorch on the bundle's host/ files): these numbers measure "
                     "this computer, not an RK3588 NPU")
# The figures of `results`, each {"median", "min", "max"}; vision_ms_per_tile has one per NPU core mode.
RESULT_KEYS = ("vision_ms_per_tile", "image_encode_ms", "frontend_alone_ms", "ttft_ms", "prefill_tok_s",
               "decode_tok_s", "text128_prefill_ms", "text128_decode_tok_s", "peak_rss_mb")
# NPU cores an image request's tiles run on at once, per core mode
NPU_CORES_USED = {"parallel": 3, "single": 1, "all": 3}
SIMULATION_NOTE = ("a scheduling model of the NPU (MS per tile on each of 3 cores, rows from the emulation): it "
                   "measures how the front end overlaps the NPU, not how fast a board is")
COUNT_KEYS = ("prompt_tokens", "decode_tokens", "text128_decode_tokens")

# Read-only clock state recorded with the results (scripts/board_clocks.sh pins them).
_CPU_POLICIES = "devices/system/cpu/cpufreq"
_DEVFREQ = "class/devfreq"


def synthetic_image(side: int = DEFAULT_IMAGE_SIDE, seed: int = 0, *, size: Optional[tuple[int, int]] = None,
                    jpeg: bool = False) -> bytes:
    """The default workload image as PNG bytes: deterministic, photo-like, different in every tile;
    `size` (width, height) and `jpeg` (quality 90, as a camera writes) for a photo of another size."""
    import cv2

    width, height = size or (side, side)
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    rgb = np.stack([128 + 90 * np.sin(x / 37 + y / 97), 128 + 90 * np.cos(y / 29 - x / 300),
                    128 + 70 * np.sin((x - y) / 17)], -1)
    rgb += rng.integers(-24, 25, rgb.shape, dtype=np.int16)
    bgr = np.ascontiguousarray(np.clip(rgb, 0, 255).astype(np.uint8)[:, :, ::-1])
    params = [cv2.IMWRITE_JPEG_QUALITY, 90] if jpeg else [cv2.IMWRITE_PNG_COMPRESSION, 1]
    ok, encoded = cv2.imencode(".jpg" if jpeg else ".png", bgr, params)
    if not ok:
        raise SmolVLMError("OpenCV could not encode the synthetic image")
    return encoded.tobytes()


class SimulatedNPU(VisionEncoder):
    """A scheduling model of the RK3588's NPU for measuring the pipeline's overlap off the board.

    `cores` workers (3, like the `parallel` mode), each taking `ms_per_tile` per tile, sleeping: like
    the NPU, they leave the CPU to the front end. The rows are the wrapped encoder's (the ONNX
    emulation), so the pipeline completes; they are computed once per distinct tile (by content), so
    after a warm-up run the simulated cores cost no CPU; a tile whose rows took longer than
    `ms_per_tile` is counted in `overruns`.
    """

    backend = "simulated-npu"

    def __init__(self, inner: VisionEncoder, ms_per_tile: float, cores: int = 3):
        super().__init__(tile=inner.tile, tokens_per_tile=inner.tokens_per_tile, hidden_size=inner.hidden_size,
                         feed=inner.feed, workers=cores)
        self.inner, self.ms_per_tile, self.cores = inner, ms_per_tile, f"{cores} simulated"
        self.overruns = 0
        self._rows: dict[bytes, np.ndarray] = {}
        self._lock = threading.Lock()

    def encode_one(self, tile: np.ndarray) -> np.ndarray:
        start = time.perf_counter()
        key = hashlib.sha1(tile.tobytes()).digest()
        with self._lock:
            rows = self._rows.get(key)
        if rows is None:
            rows = self.inner.encode_one(tile)
            with self._lock:
                self._rows[key] = rows
        left = self.ms_per_tile / 1e3 - (time.perf_counter() - start)
        if left > 0:
            time.sleep(left)
        else:
            with self._lock:
                self.overruns += 1
        return rows

    def close(self) -> None:
        super().close()
        self.inner.close()


def summarize(values: Sequence[float]) -> dict[str, float]:
    """Median and spread of one figure over the measured runs."""
    return {"median": round(float(statistics.median(values)), 2), "min": round(float(min(values)), 2),
            "max": round(float(max(values)), 2)}


def lookup(result: dict[str, Any], key: str) -> dict[str, float]:
    """The statistics of a dotted key of `results`, e.g. 'vision_ms_per_tile.single'."""
    node: Any = result["results"]
    for part in key.split("."):
        if not isinstance(node, dict) or part not in node:
            raise KeyError(f"the bench JSON has no results.{key}")
        node = node[part]
    return node


def check_budget(result: dict[str, Any], key: str, rule: dict[str, Any]) -> Optional[str]:
    """None when the median of `key` is within `rule` ({"max": x} or {"min": x}), else why not."""
    stats = lookup(result, key)
    median, spread = stats["median"], f"min {stats['min']}, max {stats['max']}, {result['workload']['runs']} runs"
    why = f" ({rule['why']})" if rule.get("why") else ""
    if "max" in rule and median > rule["max"]:
        return f"{key}: measured median {median} ({spread}) is above the budget of at most {rule['max']}{why}"
    if "min" in rule and median < rule["min"]:
        return f"{key}: measured median {median} ({spread}) is below the budget of at least {rule['min']}{why}"
    return None


def budget_entry(budgets: dict[str, Any], bundle: Any) -> Optional[dict[str, Any]]:
    """The budgets file's entry whose `match` fits the bundle (vision family and decoder hidden size)."""
    family = bundle.manifest.get(S.Manifest.MODEL, {}).get(S.Model.FAMILY)
    facts = {"vision_family": family, "hidden_size": bundle.hidden_size}
    for entry in budgets.get("models", []):
        if all(facts.get(k) == v for k, v in entry.get("match", {}).items()):
            return entry
    return None


# -- versions and clocks ----------------------------------------------------------------------


def npu_driver_version(paths: SystemPaths = SystemPaths()) -> Optional[str]:
    """The rknpu driver version as the board checks read it (board.system_checks), or None."""
    text, _ = read_npu_driver_version(paths)
    version = parse_version(text) if text else None
    return ".".join(map(str, version)) if version else None


def rknn_sdk_version(rknn_path: Path) -> Optional[str]:
    """librknnrt's own version report (RKNNLite.get_sdk_version needs a loaded model), or None."""
    try:
        from rknnlite.api import RKNNLite
    except ImportError:
        return None
    runtime = RKNNLite(verbose=False)
    try:
        if runtime.load_rknn(str(rknn_path)) != 0 or runtime.init_runtime(core_mask=RKNNLite.NPU_CORE_0) != 0:
            return None
        report = getattr(runtime, "get_sdk_version", None)
        return " ".join(str(report()).split()) if report else None
    finally:
        runtime.release()


def versions(bundle: Any, emulate: bool, librknnrt: Optional[str] = None) -> dict[str, Any]:
    """Every runtime version that decides the numbers, with the toolkits that built the bundle.
    `librknnrt`: the runtime's report when an open vision encoder already read it
    (RKNNVisionEncoder.sdk_version); without it the model is loaded into a runtime of its own to ask."""
    from board.bundle import VISION_RKNN
    from board.rkllm_h import RKLLM_VERSION, find_library

    out: dict[str, Any] = {"board": __version__, "npu_driver": None, "librkllmrt": None, "librknnrt": None,
                           "rknn_toolkit_lite2": package_version("rknn-toolkit-lite2"),
                           "onnxruntime": None, "torch": None,
                           "bundle_toolkits": bundle.manifest.get(S.Manifest.TOOLKITS, {})}
    if emulate:
        out["onnxruntime"], out["torch"] = package_version("onnxruntime"), package_version("torch")
        return out
    out["npu_driver"] = npu_driver_version()
    library, _ = find_library([bundle.root])
    # librkllmrt reports no version; the binding loads only a library with the 1.3.0 ABI (board.rkllm_h)
    out["librkllmrt"] = {"path": str(library), "abi": RKLLM_VERSION} if library else None
    out["librknnrt"] = librknnrt or rknn_sdk_version(bundle.path(VISION_RKNN))
    return out


def _read(path: Path) -> Optional[str]:
    try:
        return path.read_text().strip()
    except OSError:
        return None


def clocks(sys_root: Path = Path("/sys")) -> dict[str, Any]:
    """Governor and current frequency of the CPU clusters, the NPU and the memory controller."""
    out: dict[str, Any] = {}
    for policy in sorted((sys_root / _CPU_POLICIES).glob("policy*")):
        out[f"cpu_{policy.name}"] = {"governor": _read(policy / "scaling_governor"),
                                     "cur_khz": _read(policy / "scaling_cur_freq")}
    for node in sorted((sys_root / _DEVFREQ).glob("*")):
        if "npu" in node.name or node.name == "dmc":
            out["npu" if "npu" in node.name else "ddr"] = {"governor": _read(node / "governor"),
                                                          "cur_hz": _read(node / "cur_freq")}
    return out


def system_info() -> dict[str, Any]:
    soc = _read(SystemPaths().device_tree_compatible)
    return {"machine": platform.machine(), "kernel": platform.release(), "python": platform.python_version(),
            "soc": soc.split("\0")[0] if soc else None, "clocks": clocks()}


# -- the measurements -------------------------------------------------------------------------


def text_ids(pipeline: Any, n: int = TEXT_TOKENS) -> np.ndarray:
    """Exactly `n` token ids of a templated user question (the question cut to fit), for the text run."""
    fmt = pipeline.format
    head = pipeline.tokenizer.encode(fmt.bos + fmt.roles["user"][0], add_special_tokens=False).ids
    tail = pipeline.tokenizer.encode(fmt.end_of_turn + fmt.generation_prompt, add_special_tokens=False).ids
    filler = " ".join(["Write a long story about a robot who learns to paint the sea at night."] * 40)
    body = pipeline.tokenizer.encode(filler, add_special_tokens=False).ids
    ids = head + body[: max(0, n - len(head) - len(tail))] + tail
    return np.asarray(ids[:n], dtype=np.int64)


def frontend_alone(image_bytes: bytes, settings: Any) -> tuple[float, np.ndarray, list[int]]:
    """Decode + split of one image with nothing else running, as the pipeline does them: (ms, tiles, size)."""
    from board.tiles import split_bytes

    start = time.perf_counter()
    tiled = split_bytes(image_bytes, settings)
    return (time.perf_counter() - start) * 1e3, tiled.tiles, list(tiled.plan.source)


def run_bench(bundle_dir: str | Path, *, emulate: bool = False, runs: int = 3, warmup: int = 1,
              image: Optional[str | Path] = None, photo: Optional[tuple[int, int]] = None,
              prompt: str = DEFAULT_PROMPT, new_tokens: int = DEFAULT_NEW_TOKENS,
              npu_cores: str = "parallel", simulate_npu_ms: Optional[float] = None, verify: bool = True,
              log: Callable[[str], None] = lambda line: None) -> dict[str, Any]:
    """Run the workload (module docstring) and return the bench JSON object."""
    from board.bundle import Bundle
    from board.decoder import GenerationResult, SamplingParams
    from board.image_io import read_bytes
    from board.pipeline import Pipeline, open_vision_encoder, peak_rss_mb
    from board.sequence import embed_tokens

    if runs < 1 or warmup < 0 or new_tokens < 1:
        raise InputError("--runs and --new-tokens must be at least 1, --warmup at least 0")
    if simulate_npu_ms is not None and (not emulate or simulate_npu_ms <= 0):
        raise InputError("--simulate-npu-ms needs --emulate and a positive time per tile")
    if image and photo:
        raise InputError("give --image or --photo, not both")
    if image:
        image_bytes = read_bytes(image)
    else:
        image_bytes = synthetic_image(size=photo, jpeg=True) if photo else synthetic_image()
    greedy = SamplingParams(max_new_tokens=new_tokens)
    figures: dict[str, list[float]] = {k: [] for k in RESULT_KEYS if k != "vision_ms_per_tile"}
    counts: dict[str, list[float]] = {k: [] for k in COUNT_KEYS}
    npu_alone: list[float] = []

    log(f"loading {bundle_dir} ({'emulation' if emulate else 'npu'})")
    simulated: Optional[SimulatedNPU] = None
    source: Any = bundle_dir
    if simulate_npu_ms is not None:
        source = Bundle.open(bundle_dir, verify=verify, need_decoder=False)
        simulated = SimulatedNPU(open_vision_encoder(source, emulate=True, verify=verify), simulate_npu_ms)
    with Pipeline(source, emulate=emulate, verify=verify, npu_cores=npu_cores, sampling=greedy,
                  vision=simulated) as pipeline:
        bundle, described = pipeline.bundle, pipeline.describe()
        ids = text_ids(pipeline)
        rows = embed_tokens(pipeline.table, ids)
        tiles_per_image: list[int] = []
        for i in range(warmup + runs):
            measured = i >= warmup
            if simulated is not None and i == warmup:
                simulated.overruns = 0  # the warm-up computes the emulation's rows; count the measured runs only
            log(f"{'run' if measured else 'warm-up'} {i - warmup + 1 if measured else i + 1}: image request")
            pipeline.cache.clear()
            answer = pipeline.ask(prompt, [image_bytes], sampling=greedy).collect()
            t = answer.timings
            log("  front end alone")
            alone_ms, tiles, image_shape = frontend_alone(image_bytes, pipeline.settings)
            if simulated is not None:
                log("  simulated NPU alone")
                start = time.perf_counter()
                simulated.encode(tiles)
                npu_alone.append((time.perf_counter() - start) * 1e3)
            log(f"  text-{len(ids)} request")
            text = GenerationResult.collect(pipeline.decoder.generate(rows, sampling=greedy, keep_history=False))
            if not measured:
                continue
            tiles_per_image = answer.tiles_per_image
            figures["image_encode_ms"].append(t.image_encode_ms)
            figures["frontend_alone_ms"].append(alone_ms)
            figures["ttft_ms"].append(t.ttft_ms)
            figures["prefill_tok_s"].append(t.prefill_tok_s)
            figures["decode_tok_s"].append(t.decode_tok_s)
            figures["text128_prefill_ms"].append(text.stats.prefill_ms)
            figures["text128_decode_tok_s"].append(text.stats.decode_tok_s)
            figures["peak_rss_mb"].append(peak_rss_mb())
            counts["prompt_tokens"].append(t.prompt_tokens)
            counts["decode_tokens"].append(len(answer.token_ids))
            counts["text128_decode_tokens"].append(len(text.token_ids))
        overruns = simulated.overruns if simulated is not None else 0

    per_mode: dict[str, dict[str, float]] = {}
    for mode in NPU_CORE_MODES:
        log(f"vision mode '{mode}': {len(tiles)} tiles x {runs} runs")
        # the pipeline checked the files when it loaded; with --emulate every mode is the same ONNX session
        with open_vision_encoder(bundle, emulate=emulate, npu_cores=mode, verify=False) as encoder:
            encoder.encode(tiles[:1])  # warm-up: first-run allocations stay out of the figure
            values = []
            for _ in range(runs):
                start = time.perf_counter()
                encoder.encode(tiles)
                values.append((time.perf_counter() - start) * 1e3 / len(tiles))
        per_mode[mode] = summarize(values)

    result: dict[str, Any] = {
        "schema": SCHEMA,
        "backend": "emulate" if emulate else "npu",
        "warning": EMULATION_WARNING if emulate else None,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "bundle": {"path": str(Path(bundle_dir).expanduser().resolve()), "model": bundle.model_id,
                   "tiny": bundle.is_tiny, "vision_dtype": bundle.vision.get(S.Vision.DTYPE),
                   "vision_layout": bundle.vision_layout, "tile": bundle.split_settings.tile,
                   "tokens_per_tile": bundle.prompt_format.image_seq_len, "max_context": bundle.max_context},
        "runtime": {"vision": described["vision"], "decoder": described["decoder"], "load_ms": described["load_ms"]},
        "versions": versions(bundle, emulate, described["vision_runtime"]),
        "system": system_info(),
        "workload": {
            "image": str(image) if image else (f"synthetic {photo[0]}x{photo[1]} JPEG (seed 0)" if photo else
                                               f"synthetic {DEFAULT_IMAGE_SIDE}x{DEFAULT_IMAGE_SIDE} PNG (seed 0)"),
            "image_size": image_shape, "tiles": int(sum(tiles_per_image)), "prompt": prompt,
            "text_tokens": len(ids), "new_tokens": new_tokens, "sampling": "greedy", "npu_cores": npu_cores,
            "npu_cores_used": simulated.workers if simulated else (None if emulate else NPU_CORES_USED[npu_cores]),
            "runs": runs, "warmup": warmup,
        },
        "results": {"vision_ms_per_tile": per_mode, **{k: summarize(v) for k, v in figures.items()}},
        "counts": {k: summarize(v) for k, v in counts.items()},
        "simulated_npu": None,
    }
    if simulated is not None:
        encode, alone = statistics.median(figures["image_encode_ms"]), statistics.median(figures["frontend_alone_ms"])
        npu = statistics.median(npu_alone[warmup:])
        result["simulated_npu"] = {
            "note": SIMULATION_NOTE, "ms_per_tile": simulate_npu_ms, "cores": simulated.workers,
            "npu_alone_ms": summarize(npu_alone[warmup:]),
            "hidden_fraction": round((npu + alone - encode) / alone, 3),
            "target_met": encode <= npu + alone / 2,  # at least half of the front end hidden
            "overruns": overruns,
        }
    return result


# -- output -----------------------------------------------------------------------------------


def readme_row(result: dict[str, Any]) -> str:
    """The README results-table row for this run (medians)."""
    r, w, v = result["results"], result["workload"], result["versions"]
    modes = " / ".join(f"{r['vision_ms_per_tile'][m]['median']:.0f}" for m in NPU_CORE_MODES)
    librkllmrt = v["librkllmrt"]["abi"] if v["librkllmrt"] else "-"
    clock_state = result["system"]["clocks"].get("npu", {}).get("governor") or "?"
    return (f"| {result['system'].get('soc') or result['system']['machine']} ({result['backend']}) "
            f"| {result['bundle']['model']} {result['bundle']['vision_dtype']} | {modes} "
            f"| {r['image_encode_ms']['median'] / 1e3:.2f} s ({w['tiles']} tiles) | {r['ttft_ms']['median'] / 1e3:.2f} s "
            f"| {r['prefill_tok_s']['median']:.0f} | {r['text128_prefill_ms']['median']:.0f} "
            f"| {r['decode_tok_s']['median']:.1f} / {r['text128_decode_tok_s']['median']:.1f} "
            f"| {r['peak_rss_mb']['median']:.0f} | npu {v['npu_driver'] or '?'}, rkllm {librkllmrt} "
            f"| {clock_state} |")


def render_text(result: dict[str, Any]) -> str:
    lines = []
    if result["warning"]:
        lines.append(f"NOTE: {result['warning']}")
    w = result["workload"]
    lines.append(f"{result['bundle']['model']} on {result['backend']}: {w['image']}, {w['tiles']} tiles, "
                 f"{w['runs']} runs (median [min..max])")
    for key in RESULT_KEYS:
        value = result["results"][key]
        entries = value.items() if key == "vision_ms_per_tile" else [("", value)]
        for mode, s in entries:
            name = f"{key} ({mode})" if mode else key
            lines.append(f"  {name:<32} {s['median']:>10.2f}  [{s['min']:.2f}..{s['max']:.2f}]")
    sim = result.get("simulated_npu")
    if sim:
        lines.append(f"simulated NPU ({sim['ms_per_tile']:g} ms/tile on {sim['cores']} cores; {sim['note']}):")
        lines.append(f"  {'npu_alone_ms':<32} {sim['npu_alone_ms']['median']:>10.2f}  "
                     f"[{sim['npu_alone_ms']['min']:.2f}..{sim['npu_alone_ms']['max']:.2f}]")
        lines.append(f"  {'hidden_fraction':<32} {sim['hidden_fraction']:>10.3f}  (target >= 0.5: "
                     f"{'met' if sim['target_met'] else 'not met'}; {sim['overruns']} overrun tiles)")
    lines.append("README row: " + readme_row(result))
    return "\n".join(lines)


def _size(text: str) -> tuple[int, int]:
    try:
        width, height = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected WIDTHxHEIGHT, e.g. 4032x3024, got {text!r}") from None
    if not (16 <= width <= 8192 and 16 <= height <= 8192):
        raise argparse.ArgumentTypeError(f"each side must be 16..8192 pixels, got {text!r}")
    return width, height


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog="The workload is described in board/bench.py's docstring and the README (Benchmarks). "
        "Pin the clocks first for comparable numbers: sudo scripts/board_clocks.sh pin.",
    )
    parser.add_argument("--bundle", required=True, metavar="DIR", help="the bundle folder made by host.convert")
    parser.add_argument("--emulate", action="store_true", help="x86 emulation (ONNX Runtime + PyTorch); the JSON "
                        "says backend 'emulate': these are not board numbers")
    parser.add_argument("--json", action="store_true", help="print one JSON object (default: a readable summary)")
    parser.add_argument("--out", metavar="FILE", help="also write the JSON object to FILE")
    parser.add_argument("--runs", type=int, default=3, metavar="N", help="measured runs per figure (3)")
    parser.add_argument("--warmup", type=int, default=1, metavar="N", help="unmeasured runs first (1)")
    parser.add_argument("--image", metavar="PATH", help="use this image instead of the synthetic 2048x2048 one")
    parser.add_argument("--photo", metavar="WxH", type=_size, help="use a synthetic photo-like JPEG of this size "
                        "instead, e.g. 4032x3024 (a 12 MP phone photo)")
    parser.add_argument("--prompt", default=DEFAULT_PROMPT, help=f"the question ({DEFAULT_PROMPT!r})")
    parser.add_argument("--new-tokens", type=int, default=DEFAULT_NEW_TOKENS, metavar="N",
                        help=f"greedy tokens per answer, at most ({DEFAULT_NEW_TOKENS})")
    parser.add_argument("--npu-cores", choices=NPU_CORE_MODES, default="parallel",
                        help="NPU core mode of the image request (every mode is measured for vision_ms_per_tile)")
    parser.add_argument("--simulate-npu-ms", type=float, metavar="MS",
                        help="with --emulate: replace the vision backend by a scheduling model of the NPU (MS per "
                        "tile on each of 3 cores, rows from the emulation) and report how much of the front end "
                        "hides behind it (simulated_npu in the JSON); not a board figure")
    parser.add_argument("--no-verify", action="store_true", help="skip the sha256 check of the bundle's files")
    parser.add_argument("--budgets", metavar="FILE", nargs="?", const=str(BUDGETS_FILE),
                        help="check the medians against a budgets file (without FILE: the package's own, "
                        f"{BUDGETS_FILE.name}); exit status 3 names each stage over budget")
    parser.add_argument("--quiet", action="store_true", help="no progress lines on stderr")
    return parser


EXIT_ERROR, EXIT_OVER_BUDGET = 1, 3


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.runs < 1 or args.warmup < 0 or args.new_tokens < 1:
        parser.error("--runs and --new-tokens must be at least 1, --warmup at least 0")
    if args.simulate_npu_ms is not None and (not args.emulate or args.simulate_npu_ms <= 0):
        parser.error("--simulate-npu-ms needs --emulate (it replaces the emulation's vision backend) and a positive "
                     "time per tile")
    if args.emulate:
        os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    log = (lambda line: None) if args.quiet else (lambda line: print(f"[bench] {line}", file=sys.stderr, flush=True))
    try:
        entry = None
        if args.budgets:  # before the run: a budgets file without this model is known at once
            from board.bundle import Bundle

            try:
                budgets = json.loads(Path(args.budgets).read_text())
            except (OSError, ValueError) as exc:
                raise InputError(f"cannot read the budgets file {args.budgets}: {exc}") from exc
            entry = budget_entry(budgets, Bundle.open(args.bundle, verify=False))
            if entry is None:
                raise InputError(f"{args.budgets} has no budgets for this model (entries match on the vision "
                                 "family and the decoder's hidden size)")
        result = run_bench(args.bundle, emulate=args.emulate, runs=args.runs, warmup=args.warmup, image=args.image,
                           photo=args.photo, prompt=args.prompt, new_tokens=args.new_tokens, npu_cores=args.npu_cores,
                           simulate_npu_ms=args.simulate_npu_ms, verify=not args.no_verify, log=log)
        problems: list[str] = []
        if entry is not None:
            problems = [p for key, rule in entry["budgets"].items() if (p := check_budget(result, key, rule))]
            result["budgets"] = {"file": args.budgets, "entry": entry.get("name"), "over_budget": problems}
    except SmolVLMError as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        print("\n(interrupted)", file=sys.stderr)
        return 130
    text = json.dumps(result, ensure_ascii=False)
    if args.out:
        Path(args.out).write_text(text + "\n")
    print(text if args.json else render_text(result))
    for problem in problems:
        print(f"over budget: {problem}", file=sys.stderr)
    return EXIT_OVER_BUDGET if problems else 0


if __name__ == "__main__":
    sys.exit(main())
