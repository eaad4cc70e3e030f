"""`python -m board doctor --bundle DIR [--emulate] [--json]`: prove, on a new board, every assumption the
runtime makes about Rockchip's stack, or say exactly which one broke.

Run it first on a new board, and attach its `--json` output to a bug report. On x86, `--emulate` runs
the same checks on the emulation backends (ONNX Runtime and PyTorch on the bundle's host/ files).
The reference the checks compare with was written by host.convert from the checkpoint's
full-precision model (host/reference.py): one tile and its vision rows, and the fp32 decoder's first
greedy token ids for a text prompt and an image prompt (that tile, unsplit).

Checks, in order; each is ok true / false, or null = skipped with the reason:
  system            the board checks (SoC, NPU driver, librknnrt, rknnlite, librkllmrt); with --emulate
                    the emulation's needs instead, and null when those are there
  bundle            opens and verifies: checksums, format and target, settings, versions; on the board
                    the bundle's SoC and NPU-driver minimum against this board
  vision_reference  the NPU (or emulation) rows for the reference tile vs the stored rows: cosine at
                    least the threshold the model was built to (0.999 fp16, 0.99 int8)
  vision_cores      every NPU core mode (parallel, single, all) gives the same rows; ms per tile each
  decoder_reference the decoder's greedy ids vs the stored full-precision ones. Emulation must match
                    exactly; W8A8 on the board may drift: it fails on garbage (one token repeated, or the
                    first token wrong on every prompt) and warns below DECODER_WARN_BELOW agreement
  prefill_count     the runtime's perf.prefill_tokens equals the rows fed (no template added or dropped)
  history           two chat turns kept in the KV cache == the same conversation fed fresh
  eos               a prompt the full-precision model ends stops before the token limit
  abort             a run aborted mid-way returns promptly (ABORT_WITHIN_S) and the next run works

JSON: {"ok", "checks": [{"name", "ok", "detail", ...figures, "hint"?, "warning"?}], "versions", "clocks"}.
Exit status: 0 every check that ran passed, 1 one failed, 2 bad arguments, 130 interrupted.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import threading
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Optional, Sequence

if __package__ in (None, ""):  # run as a script (python board/doctor.py): board/_script_path.py fixes sys.path
    import runpy

    runpy.run_path(str(Path(__file__).with_name("_script_path.py")))

import numpy as np  # noqa: E402

from board import bundle_schema as S  # noqa: E402
from board.decoder import SamplingParams  # noqa: E402
from board.decoder_rkllm import LOG_LEVEL_ENV  # noqa: E402
from board.errors import PrefillMismatch, SmolVLMError, VisionError  # noqa: E402
from board.prompt import _IMAGE_TYPES, Prompt, PromptFormat, build_prompt, normalize_content  # noqa: E402
from board.sequence import build_sequence, stack_rows  # noqa: E402
from board.system_checks import FAIL, WARN, SystemPaths, check_emulation, run_checks  # noqa: E402
from board.tiles import SplitSettings, TilePlan, plan_tiles  # noqa: E402
from board.vision import DEFAULT_MIN_COSINE, NPU_CORE_MODES, EncodedImage, VisionEncoder  # noqa: E402

CHECKS = ("system", "bundle", "vision_reference", "vision_cores", "decoder_reference", "prefill_count", "history",
          "eos", "abort")
CORES_MIN_COSINE = 0.9999  # the same model on other NPU cores: the same rows up to accumulation order
DECODER_WARN_BELOW = 0.5  # W8A8 on the board: warn when the mean agreement with the fp32 ids is below this
GARBAGE_RUN = 4  # this many or more generated tokens, all one id: garbage (unless the reference does it too)
ABORT_WITHIN_S = 2.0
ABORT_AFTER_TOKENS = 3
ABORT_PROMPT = "Count from one to one hundred in words, one number per line."
HISTORY_TURNS = ("Hello! Who are you?", "Say that again in other words.")
HISTORY_TOKENS = 8
EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130


# -- the reference prompts (host/reference.py builds them with these) ------------------------------


def tile_plan(settings: SplitSettings) -> TilePlan:
    """The plan of the reference tile given as an image: one unsplit tile (the global view only)."""
    return plan_tiles(settings.tile, settings.tile, settings.with_tiles_per_side(0))


def reference_prompt(messages: Sequence[Mapping[str, Any]], fmt: PromptFormat, tokenizer: Any, image_token_id: int,
                     settings: SplitSettings) -> Prompt:
    """A reference conversation's prompt: every image item is the reference tile, unsplit."""
    images = sum(1 for m in messages for item in normalize_content(m["content"]) if item["type"] in _IMAGE_TYPES)
    return build_prompt(messages, [tile_plan(settings)] * images, fmt, tokenizer, image_token_id)


def reference_sequence(prompt: Prompt, table: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """The decoder's input for a reference prompt: the table's rows, the tile's vision `rows` in each image slot."""
    return build_sequence(prompt, table, stack_rows([rows[None]] * len(prompt.tiles_per_image), table.shape[1]))


# -- results ------------------------------------------------------------------------------------------


@dataclass
class Check:
    """One check's outcome: ok True/False, or None (skipped; `detail` says why)."""

    name: str
    ok: Optional[bool]
    detail: str
    figures: dict[str, Any] = field(default_factory=dict)
    hint: Optional[str] = None
    warning: Optional[str] = None

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"name": self.name, "ok": self.ok, "detail": self.detail, **self.figures}
        if self.warning:
            out["warning"] = self.warning
        if self.hint:
            out["hint"] = self.hint
        return out

    def line(self) -> str:
        tag = {True: "warn" if self.warning else " ok ", False: "FAIL", None: "skip"}[self.ok]
        text = f"[{tag}] {self.name}: {self.detail}"
        if self.warning:
            text += f"\n       warning: {self.warning}"
        return text + (f"\n       hint: {self.hint}" if self.hint else "")


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.reshape(-1).astype(np.float64), b.reshape(-1).astype(np.float64)
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b) + 1e-30))


def token_cosine_min(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.reshape(-1, a.shape[-1]).astype(np.float64), b.reshape(-1, b.shape[-1]).astype(np.float64)
    return float(((a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1) + 1e-30)).min())


def agreement(ids: Sequence[int], reference: Sequence[int]) -> float:
    """Greedy agreement: the share of the reference's ids the run reproduced before it first differed."""
    same = 0
    for a, b in zip(ids, reference):
        if a != b:
            break
        same += 1
    return same / len(reference) if reference else 1.0


def is_garbage(ids: Sequence[int], reference: Sequence[int]) -> bool:
    """One token repeated over the whole answer (GARBAGE_RUN or more) where the reference does not do that."""
    return len(ids) >= GARBAGE_RUN and len(set(ids)) == 1 and not (reference and len(set(reference)) == 1
                                                                  and reference[0] == ids[0])


def judge_decoder(results: Mapping[str, Mapping[str, Any]], *, exact: bool) -> tuple[bool, str, Optional[str]]:
    """The decoder_reference verdict from each prompt's {agreement, first_token, garbage}: (ok, detail, warning).

    `exact` (emulation: the same fp32 model) needs agreement 1.0 on every prompt. Otherwise (W8A8 on
    the board) drift is allowed: garbage on any prompt, or the first token wrong on every prompt,
    fails; a mean agreement below DECODER_WARN_BELOW passes with a warning.
    """
    shown = ", ".join(f"{name} {r['agreement']:.2f}" for name, r in results.items())
    mean = float(np.mean([r["agreement"] for r in results.values()]))
    if exact:
        ok = all(r["agreement"] == 1.0 for r in results.values())
        return ok, f"greedy ids vs the full-precision reference: {shown} (emulation runs the same fp32 model: " \
                   "every prompt must be 1.00)", None
    garbage = [name for name, r in results.items() if r["garbage"]]
    if garbage:
        return False, f"garbage on {', '.join(garbage)} (one token repeated); agreement {shown}", None
    if all(not r["first_token"] for r in results.values()):
        return False, f"the first token is wrong on every prompt; agreement {shown}", None
    warning = (f"mean agreement {mean:.2f} is below {DECODER_WARN_BELOW}: W8A8 drifts more than expected (answers "
               "may differ from the reference model's)") if mean < DECODER_WARN_BELOW else None
    return True, f"greedy ids vs the full-precision reference: {shown} (W8A8 may drift; the first token matches)", warning


class _NoVision(VisionEncoder):
    """Stands in the pipeline's vision slot when the encoder did not open: the decoder checks feed the
    stored rows and never encode; anything that tries gets the reason."""

    backend = "none"

    def __init__(self, why: str, bundle: Any):
        super().__init__(tile=bundle.split_settings.tile, tokens_per_tile=bundle.prompt_format.image_seq_len,
                         hidden_size=bundle.hidden_size, feed=None)  # type: ignore[arg-type]
        self.why = why

    def _encode(self, tiles: np.ndarray) -> np.ndarray:
        raise VisionError(f"the vision encoder did not open: {self.why}")


@dataclass
class _Run:
    """What one decoder run gave the doctor."""

    ids: list[int]
    finish: str
    stats: Any


# -- the doctor -----------------------------------------------------------------------------------------


class Doctor:
    """Runs the checks on one bundle. `decoder`/`vision` replace the backends (the tests' C double)."""

    def __init__(self, bundle_dir: str | Path, *, emulate: bool = False, vision_fallback: bool = False,
                 paths: SystemPaths = SystemPaths(), rkllm_log_level: Optional[int] = None,
                 decoder: Any = None, vision: Optional[VisionEncoder] = None,
                 log: Callable[[str], None] = lambda line: None):
        self.root = Path(bundle_dir).expanduser()
        self.emulate, self.vision_fallback, self.paths = emulate, vision_fallback, paths
        self.rkllm_log_level = rkllm_log_level
        self._decoder, self._vision = decoder, vision
        self.log = log
        self.checks: dict[str, Check] = {}
        self.bundle: Any = None
        self.pipeline: Any = None
        self.encoder: Optional[VisionEncoder] = None
        self.tile: Optional[np.ndarray] = None
        self.rows: Optional[np.ndarray] = None
        self.reference_runs: dict[str, _Run] = {}
        self.vision_runtime: dict[str, Any] = {}  # the encoder's own version report and notices

    # -- bookkeeping ------------------------------------------------------------------------------

    def _set(self, check: Check) -> None:
        self.checks[check.name] = check
        self.log(check.line().splitlines()[0])

    def _skip_rest(self, why: str) -> None:
        for name in CHECKS:
            self.checks.setdefault(name, Check(name, None, f"not run: {why}"))

    def run(self) -> dict[str, Any]:
        """Every check (CHECKS), then the result object (module docstring)."""
        try:
            self._system()
            if self._bundle():
                self._vision_checks()
                if self._open_pipeline():
                    for name, step in (("prefill_count", self._prefill_count), ("decoder_reference",
                                       self._decoder_reference), ("history", self._history), ("eos", self._eos),
                                       ("abort", self._abort)):
                        try:
                            step()
                        except SmolVLMError as err:  # what a check did not foresee still names the check
                            self._set(Check(name, False, f"failed: {err.message}", hint=err.hint))
        finally:
            self._close()
        self._skip_rest("an earlier step did not complete")
        checks = [self.checks[name] for name in CHECKS]
        return {"ok": all(c.ok is not False for c in checks), "backend": "emulate" if self.emulate else "npu",
                "bundle": str(self.root), "checks": [c.to_dict() for c in checks], "versions": self._versions(),
                "clocks": self._clocks()}

    def _close(self) -> None:
        pipeline, self.pipeline = self.pipeline, None
        encoder, self.encoder = self.encoder, None
        if pipeline is not None:
            pipeline.close()  # closes the encoder it was given too
        elif encoder is not None:
            encoder.close()

    # -- system and bundle ------------------------------------------------------------------------

    def _system(self) -> None:
        if self.emulate:
            needs = check_emulation()
            missing = [r for r in needs if r.failed]
            if missing:
                self._set(Check("system", False, "; ".join(f"{r.name}: {r.message}" for r in missing),
                                hint=" | ".join(r.hint for r in missing if r.hint)))
            else:
                self._set(Check("system", None, "x86 emulation: the board checks (SoC, NPU driver, librknnrt, "
                                "rknnlite, librkllmrt) do not apply; onnxruntime, torch, transformers are there"))
            return
        results = run_checks(library_dirs=[self.root], paths=self.paths)
        failed = [r for r in results if r.status == FAIL]
        warned = [r for r in results if r.status == WARN]
        detail = "; ".join(f"{r.name}: {r.message}" for r in (failed or results))
        self._set(Check("system", not failed, detail, {"results": [vars(r) for r in results]},
                        hint=" | ".join(r.hint for r in failed if r.hint) or None,
                        warning="; ".join(f"{r.name}: {r.message}" for r in warned) or None))

    def _bundle(self) -> bool:
        from board.bundle import DECODER_HF, Bundle

        try:
            bundle = Bundle.open(self.root, verify=True, need_decoder=not self.emulate)
            model = bundle.vision_model(self.vision_fallback)
            if self.emulate:
                bundle.verify_host_files(model.onnx or "")
                bundle.verify_host_files(DECODER_HF)
            board = [] if self.emulate else bundle.check_board(self.paths)
        except SmolVLMError as err:
            self._set(Check("bundle", False, err.message, hint=err.hint))
            self._skip_rest("the bundle did not open")
            return False
        self.bundle = bundle
        D, V = S.Decoder, S.Vision
        decoder = bundle.manifest[S.Manifest.DECODER]
        figures = {
            "model": bundle.model_id, "tiny": bundle.is_tiny, "format_version": S.FORMAT_VERSION,
            "vision": {"file": model.file, "dtype": model.dtype, "layout": model.layout, "fallback": model.fallback,
                       "has_fallback": bool(bundle.vision.get(V.FALLBACK))},
            "decoder": {k: decoder.get(k) for k in (D.FILE, D.QUANTIZED_DTYPE, D.OPTIMIZATION_LEVEL, D.MAX_CONTEXT,
                                                    D.EMBED_FLASH, D.CALIBRATION, D.TOOLKIT)},
            "toolkits": bundle.built_with, "reference": bool(bundle.reference),
        }
        failed = [r for r in board if r.failed]
        detail = (f"{bundle.model_id}: every file matches its checksum; vision {model.file} ({model.dtype}, {model.layout}), "
                  f"decoder {decoder.get(D.FILE) or 'host/decoder (emulation)'}, max_context {bundle.max_context}")
        if failed:
            self._set(Check("bundle", False, "; ".join(f"{r.name}: {r.message}" for r in failed), figures,
                            hint=" | ".join(r.hint for r in failed if r.hint)))
            self._skip_rest("this board cannot run the bundle")
            return False
        warning = None if bundle.reference else ("no reference data (converted by an older host.convert): the "
                                                 "reference checks are skipped; convert it again to have them")
        self._set(Check("bundle", True, detail, figures, warning=warning))
        if bundle.reference:
            self.tile, self.rows = bundle.reference_arrays()
        return True

    # -- vision -----------------------------------------------------------------------------------

    def _open_encoder(self, mode: str) -> VisionEncoder:
        from board.pipeline import open_vision_encoder

        return open_vision_encoder(self.bundle, emulate=self.emulate, npu_cores=mode, verify=False,
                                   fallback=self.vision_fallback)

    def _timed_rows(self, encoder: VisionEncoder, runs: int = 3) -> tuple[np.ndarray, float]:
        tiles = self.tile[None]
        rows = encoder.encode(tiles)  # also the warm-up: first-run allocations stay out of the figure
        times = []
        for _ in range(runs):
            start = time.perf_counter()
            encoder.encode(tiles)
            times.append((time.perf_counter() - start) * 1e3)
        return rows[0], round(statistics.median(times), 2)

    def _vision_checks(self) -> None:
        if self._vision is not None:
            self.encoder = self._vision
        else:
            try:
                self.encoder = self._open_encoder("parallel")
            except SmolVLMError as err:
                self._set(Check("vision_reference", False, f"the vision model did not open: {err.message}", hint=err.hint))
                self._set(Check("vision_cores", None, "not run: the vision model did not open"))
                return
        self.vision_runtime = {"sdk_version": getattr(self.encoder, "sdk_version", None),
                               "notices": list(getattr(self.encoder, "notices", []))}
        if self.tile is None:
            for name in ("vision_reference", "vision_cores"):
                self._set(Check(name, None, "not run: the bundle has no reference tile (convert it again)"))
            return
        model = self.bundle.vision_model(self.vision_fallback)
        threshold = model.min_cosine or DEFAULT_MIN_COSINE.get(model.dtype, DEFAULT_MIN_COSINE["fp16"])
        try:
            rows, ms = self._timed_rows(self.encoder)
        except SmolVLMError as err:
            self._set(Check("vision_reference", False, f"the vision model failed on the reference tile: {err.message}",
                            hint=err.hint))
            self._set(Check("vision_cores", None, "not run: the vision model failed"))
            return
        cos, tok = cosine(rows, self.rows), token_cosine_min(rows, self.rows)
        ok = cos >= threshold
        source = self.bundle.reference[S.Reference.SOURCE]
        self._set(Check(
            "vision_reference", ok,
            f"cosine {cos:.5f} vs the full-precision rows of the {source} tile (threshold {threshold}, {model.dtype} "
            f"{model.layout}{', the fallback model' if model.fallback else ''}); worst token {tok:.4f}; {ms} ms/tile",
            {"cosine": round(cos, 6), "token_cosine_min": round(tok, 6), "threshold": threshold, "ms_per_tile": ms,
             "backend": getattr(self.encoder, "backend", "?")},
            hint=None if ok else "the vision model does not compute what the checkpoint's does: a vision model of another "
            "checkpoint or a damaged copy (re-copy or re-convert the bundle), or an NPU runtime problem (see versions: "
            "librknnrt must be at least the rknn-toolkit2 that built it)"
            + ("; try --vision-fallback (Rockchip's own conv input layout)" if self.bundle.vision.get(S.Vision.FALLBACK)
               and not self.vision_fallback else ""),
        ))
        self._cores(rows, ms)

    def _cores(self, rows: np.ndarray, parallel_ms: float) -> None:
        if self.emulate or self._vision is not None:
            self._set(Check("vision_cores", None, "emulation runs one ONNX Runtime session: the NPU core modes exist "
                            "only on the board" if self.emulate else "not run: a vision encoder was given",
                            {"ms_per_tile": {getattr(self.encoder, "backend", "?"): parallel_ms}}))
            return
        ms, worst, problems = {"parallel": parallel_ms}, 1.0, []
        for mode in NPU_CORE_MODES:
            if mode == "parallel":
                continue
            try:
                with self._open_encoder(mode) as encoder:
                    other, ms[mode] = self._timed_rows(encoder)
            except SmolVLMError as err:
                problems.append(f"{mode}: {err.message}")
                continue
            cos = cosine(other, rows)
            worst = min(worst, cos)
            if cos < CORES_MIN_COSINE:
                problems.append(f"{mode} gives other rows than parallel (cosine {cos:.6f})")
        detail = ", ".join(f"{mode} {value} ms/tile" for mode, value in ms.items())
        self._set(Check("vision_cores", not problems,
                        ("; ".join(problems) + f" ({detail})") if problems else f"every core mode gives the same rows "
                        f"(cosine >= {worst:.6f}); {detail}",
                        {"ms_per_tile": ms, "cosine_min": round(worst, 6)},
                        hint="use the core mode that works (--npu-cores); report the NPU driver and librknnrt versions"
                        if problems else None))

    # -- decoder ----------------------------------------------------------------------------------

    def _open_pipeline(self) -> bool:
        from board.pipeline import Pipeline

        vision = self.encoder if self.encoder is not None else _NoVision("see vision_reference", self.bundle)
        try:
            self.pipeline = Pipeline(self.bundle, emulate=self.emulate, check_system=False, vision=vision,
                                     decoder=self._decoder, vision_fallback=self.vision_fallback,
                                     rkllm_log_level=self.rkllm_log_level, sampling=SamplingParams(max_new_tokens=16))
        except SmolVLMError as err:
            self.encoder = None  # the pipeline closed it on failure (or there was none)
            self._set(Check("decoder_reference", False, f"the decoder did not load: {err.message}", hint=err.hint))
            self._skip_rest("the decoder did not load")
            return False
        return True

    def _reference_inputs(self, messages: Sequence[Mapping[str, Any]]) -> tuple[Prompt, list[EncodedImage]]:
        p = self.pipeline
        prompt = reference_prompt(messages, p.format, p.tokenizer, p.image_token_id, p.settings)
        images = [EncodedImage(tile_plan(p.settings), self.rows[None]) for _ in prompt.tiles_per_image]
        return prompt, images

    def _text_inputs(self, text: str) -> tuple[Prompt, list[EncodedImage]]:
        return self.pipeline.full_prompt([{"role": "user", "content": [{"type": "text", "text": text}]}], []), []

    def _generate(self, prompt: Prompt, images: Sequence[EncodedImage], max_new: int,
                  on_token: Callable[[int], None] = lambda n: None) -> _Run:
        p = self.pipeline
        reply = p.reply(p.begin_turn(), prompt, images, sampling=SamplingParams(max_new_tokens=max_new))
        ids, finish, stats = [], "stop", None
        for step in reply:
            if step.token_id is not None:
                ids.append(step.token_id)
                on_token(len(ids))
            if step.finish_reason is not None:
                finish, stats = step.finish_reason, step.stats
        return _Run(ids, finish, stats)

    def _prompts(self) -> list[dict[str, Any]]:
        return list(self.bundle.reference[S.Reference.PROMPTS]) if self.bundle.reference else []

    def _prefill_count(self) -> None:
        image = next((p for p in self._prompts() if p[S.ReferencePrompt.NAME] == "image"), None)
        prompt, images = self._reference_inputs(image[S.ReferencePrompt.MESSAGES]) if image else self._text_inputs(
            HISTORY_TURNS[0])
        notices = list(getattr(self.pipeline.decoder, "notices", []))
        try:
            run = self._generate(prompt, images, 2)
        except PrefillMismatch as err:
            self._set(Check("prefill_count", False, err.message + (f" ({'; '.join(notices)})" if notices else ""),
                            {"fed": len(prompt)},
                            hint="the runtime changes EMBED input (e.g. wraps it in the model's chat template); "
                            "report it with this JSON"))
            return
        except SmolVLMError as err:
            self._set(Check("prefill_count", False, f"the decoder failed: {err.message}", hint=err.hint))
            return
        fed, prefilled = len(prompt), getattr(run.stats, "prefill_tokens", None)
        ok = prefilled == fed
        self._set(Check("prefill_count", ok, f"fed {fed} rows ({'image' if image else 'text'} prompt), the runtime "
                        f"prefilled {prefilled}" + (f"; {'; '.join(notices)}" if notices else ""),
                        {"fed": fed, "prefilled": prefilled, "prefill_ms": round(getattr(run.stats, "prefill_ms", 0.0), 2)},
                        hint=None if ok else "the runtime added or dropped tokens; report it with this JSON"))

    def _decoder_reference(self) -> None:
        prompts = self._prompts()
        if not prompts:
            self._set(Check("decoder_reference", None, "not run: the bundle has no reference ids (convert it again)"))
            return
        P = S.ReferencePrompt
        results, problems = {}, []
        for entry in prompts:
            name, reference = entry[P.NAME], list(entry[P.GREEDY_IDS])
            prompt, images = self._reference_inputs(entry[P.MESSAGES])
            try:
                run = self._generate(prompt, images, self.bundle.reference[S.Reference.NEW_TOKENS])
            except SmolVLMError as err:
                problems.append(f"{name}: the decoder failed: {err.message}")
                continue
            self.reference_runs[name] = run
            results[name] = {"agreement": round(agreement(run.ids, reference), 4), "ids": run.ids,
                             "reference": reference, "first_token": bool(run.ids[:1] == reference[:1]),
                             "garbage": is_garbage(run.ids, reference)}
        figures = {"prompts": results, "warn_below": DECODER_WARN_BELOW}
        if problems:
            self._set(Check("decoder_reference", False, "; ".join(problems), figures))
            return
        ok, detail, warning = judge_decoder(results, exact=self.emulate)
        figures["agreement_mean"] = round(float(np.mean([r["agreement"] for r in results.values()])), 4)
        self._set(Check("decoder_reference", ok, detail, figures, warning=warning, hint=None if ok else (
            "the decoder computes something else than the checkpoint's: a decoder of another model or a damaged copy "
            "(re-copy or re-convert the bundle); with the right one, a W8A8 problem: report this JSON")))

    def _history(self) -> None:
        p, decoder = self.pipeline, self.pipeline.decoder
        sampling = SamplingParams(max_new_tokens=HISTORY_TOKENS)
        try:
            chat = p.chat()
            first = chat.send(HISTORY_TURNS[0], sampling=sampling)
            a1 = first.collect()
            expected = len(first.prompt) + len(a1.token_ids)
            held = getattr(decoder, "history_tokens", None)
            second = chat.send(HISTORY_TURNS[1], sampling=sampling)
            a2 = second.collect()
        except SmolVLMError as err:
            self._set(Check("history", False, f"the chat failed: {err.message}", hint=err.hint))
            return
        figures = {"expected_cache": expected, "cache": held, "second_turn_fed": len(second.prompt)}
        if a2.timings.history_tokens == 0:  # the pipeline re-fed: the cache did not hold the first turn
            self._set(Check("history", False, "; ".join(a2.notices) or "the second turn re-fed the whole conversation",
                            figures, hint="multi-turn chat re-feeds the conversation every turn (slower, answers "
                            "unchanged); report this JSON. Stateless use (run.py, the server) is not affected"))
            return
        fresh_ids = np.concatenate([first.prompt.input_ids, np.asarray(a1.token_ids, np.int64), second.prompt.input_ids])
        fresh = self._generate(Prompt(fresh_ids, np.zeros(0, np.int64), [], ""), [], HISTORY_TOKENS)
        ok = fresh.ids == a2.token_ids
        figures.update(kept=a2.token_ids, fresh=fresh.ids)
        self._set(Check("history", ok, f"turn 2 from the KV cache ({expected} cached, {len(second.prompt)} fed) "
                        + ("== " if ok else "!= ") + f"the same conversation fed fresh ({len(fresh_ids)} rows)",
                        figures, hint=None if ok else "the runtime's cache across turns does not hold what was fed "
                        "(rknn-llm issues #278/#446): use single questions or the server (stateless), and report this JSON"))

    def _eos(self) -> None:
        entry = self.bundle.reference.get(S.Reference.EOS_PROMPT) if self.bundle.reference else None
        if not entry:
            self._set(Check("eos", None, "not run: the full-precision model ends none of the reference's candidate "
                            "prompts within its search limit (a random-weight model?), so no prompt is known to end"))
            return
        P = S.ReferencePrompt
        limit = 2 * self.bundle.reference[S.Reference.EOS_SEARCH_TOKENS]
        prompt, images = self._reference_inputs(entry[P.MESSAGES])
        try:
            run = self._generate(prompt, images, limit)
        except SmolVLMError as err:
            self._set(Check("eos", False, f"the decoder failed: {err.message}", hint=err.hint))
            return
        eos_ids = self.pipeline.eos_token_ids
        streamed = bool(run.ids) and run.ids[-1] in eos_ids
        ok = run.finish == "stop" and len(run.ids) < limit
        self._set(Check(
            "eos", ok, f"'{entry[P.NAME]}' (the reference ends it after {len(entry[P.GREEDY_IDS])} tokens) "
            + (f"stopped after {len(run.ids)} tokens" if ok else f"ran to the limit of {limit} tokens without stopping")
            + f"; the end-of-turn id {'was' if streamed else 'was not'} streamed",
            {"tokens": len(run.ids), "limit": limit, "finish_reason": run.finish, "eos_streamed": streamed},
            hint=None if ok else f"the runtime does not stop at the EOS ids {sorted(eos_ids)}: decoder.rkllm's EOS is "
            "wrong (re-convert with this host.convert) or the runtime ignores it; report this JSON",
            warning=None if streamed or not ok else "the runtime does not pass the end-of-turn token to the callback: "
            "chat turns then re-feed the conversation instead of continuing the cache"))

    def _abort(self) -> None:
        p = self.pipeline
        prompt, images = self._text_inputs(ABORT_PROMPT)
        room = p.answer_room(len(prompt))
        asked: dict[str, float] = {}

        def on_token(n: int) -> None:
            if n == ABORT_AFTER_TOKENS and not asked:
                asked["at"] = time.perf_counter()
                threading.Thread(target=p.abort, name="doctor-abort").start()

        try:
            run = self._generate(prompt, images, min(256, room), on_token)
        except SmolVLMError as err:
            self._set(Check("abort", False, f"the decoder failed: {err.message}", hint=err.hint))
            return
        if "at" not in asked or (run.finish != "abort" and len(run.ids) <= ABORT_AFTER_TOKENS + 1):
            self._set(Check("abort", None, f"not run: the answer ended by itself after {len(run.ids)} tokens, as the "
                            "abort was asked"))
            return
        waited = round(time.perf_counter() - asked["at"], 3)
        figures: dict[str, Any] = {"finish_reason": run.finish, "tokens": len(run.ids), "abort_to_end_s": waited}
        if run.finish != "abort" or waited > ABORT_WITHIN_S:
            self._set(Check("abort", False, f"the run ended with '{run.finish}' {waited:.2f}s after the abort "
                            f"(budget {ABORT_WITHIN_S}s)", figures, hint="Ctrl-C and client disconnects will not stop "
                            "answers promptly; report this JSON"))
            return
        text = next((e for e in self._prompts() if e[S.ReferencePrompt.NAME] == "text"), None)
        prompt, images = self._reference_inputs(text[S.ReferencePrompt.MESSAGES]) if text else self._text_inputs(
            HISTORY_TURNS[0])
        before = self.reference_runs.get("text")
        try:
            after = self._generate(prompt, images, len(before.ids) if before else 4)
        except SmolVLMError as err:
            self._set(Check("abort", False, f"aborted in {waited:.2f}s, but the next run failed: {err.message}", figures,
                            hint="an aborted run leaves the runtime unusable: restart the process; report this JSON"))
            return
        same = before is None or after.ids == before.ids
        figures["next_run_same_ids"] = same
        self._set(Check("abort", same, f"aborted after {len(run.ids)} tokens, {waited:.2f}s from the abort to the end; "
                        + ("the next run gives the same ids as before" if same else "the next run gives other ids than "
                           "before the abort"), figures,
                        hint=None if same else "an abort leaves state behind in the runtime; report this JSON"))

    # -- versions and clocks --------------------------------------------------------------------------

    def _versions(self) -> dict[str, Any]:
        from board import __version__

        out: dict[str, Any] = {"board": __version__, "rkllm_log_level": os.environ.get(LOG_LEVEL_ENV),
                               "vision_runtime": self.vision_runtime}
        if self.bundle is not None:
            from board.bench import versions

            try:
                out.update(versions(self.bundle, self.emulate, self.vision_runtime.get("sdk_version")))
            except Exception as exc:  # noqa: BLE001 - a version report must not hide the checks
                out["error"] = f"{type(exc).__name__}: {exc}"
        return out

    @staticmethod
    def _clocks() -> dict[str, Any]:
        from board.bench import clocks

        return clocks()


def render_text(result: dict[str, Any]) -> str:
    lines = [f"board doctor: {result['bundle']} ({result['backend']})"]
    for c in result["checks"]:
        check = Check(c["name"], c["ok"], c["detail"], hint=c.get("hint"), warning=c.get("warning"))
        lines.append(check.line())
    failed = [c["name"] for c in result["checks"] if c["ok"] is False]
    if failed:
        lines.append(f"\n{len(failed)} check(s) failed: {', '.join(failed)}. Attach the output of "
                     f"`python -m board doctor --bundle {result['bundle']} --json` to a bug report.")
    else:
        lines.append("\nevery check that ran passed: python board/run.py --bundle DIR --image photo.jpg "
                     "'What is in this image?'")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m board doctor",
        description="Check a board (or --emulate on x86) against the bundle's reference: the board checks, the "
        "bundle, the vision model on each NPU core mode, the decoder's greedy ids, prefill count, KV cache across "
        "turns, EOS and abort. Run it first on a new board; attach its --json output to a bug report.",
        epilog=f"Exit status: {EXIT_OK} every check that ran passed, {EXIT_FAILED} a check failed, {EXIT_USAGE} bad "
        f"arguments, {EXIT_INTERRUPTED} interrupted. The checks are described in board/doctor.py and the README.",
    )
    parser.add_argument("--bundle", required=True, metavar="DIR", help="the bundle folder made by host.convert")
    parser.add_argument("--emulate", action="store_true", help="x86 emulation: ONNX Runtime + PyTorch on the "
                        "bundle's host/ files")
    parser.add_argument("--json", action="store_true", help="print one JSON object (default: one line per check)")
    parser.add_argument("--out", metavar="FILE", help="also write the JSON object to FILE")
    parser.add_argument("--vision-fallback", action="store_true",
                        help="check the bundle's fallback vision model (fp16, conv layout) instead of the main one")
    parser.add_argument("--rkllm-log-level", type=int, metavar="N",
                        help="set RKLLM_LOG_LEVEL for librkllmrt (1 prints its own timings); default: as it is")
    parser.add_argument("--quiet", action="store_true", help="no progress lines on stderr")
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    if args.emulate:
        os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
        warnings.filterwarnings("ignore", category=FutureWarning)  # transformers' deprecation notes, not findings
    log = (lambda line: None) if args.quiet else (lambda line: print(f"[doctor] {line}", file=sys.stderr, flush=True))
    try:
        result = Doctor(args.bundle, emulate=args.emulate, vision_fallback=args.vision_fallback,
                        rkllm_log_level=args.rkllm_log_level, log=log).run()
    except KeyboardInterrupt:
        print("\n(interrupted)", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception as err:  # a bug in a check, not a finding: one line unless SMOLVLM_DEBUG asks for the traceback
        if os.environ.get("SMOLVLM_DEBUG"):
            raise
        print(f"error: the doctor failed unexpectedly: {type(err).__name__}: {err} (set SMOLVLM_DEBUG=1 for the "
              "traceback)", file=sys.stderr)
        return EXIT_FAILED
    text = json.dumps(result, ensure_ascii=False, default=str)
    if args.out:
        Path(args.out).write_text(text + "\n")
    print(text if args.json else render_text(result))
    return EXIT_OK if result["ok"] else EXIT_FAILED


if __name__ == "__main__":
    sys.exit(main())
