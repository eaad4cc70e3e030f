"""`python board/run.py`: ask SmolVLM about images (or a video) on the RK3588, or in emulation on x86.

    python board/run.py --bundle ~/smolvlm-256m --image cat.jpg "What is in this image?"
    python board/run.py --bundle ~/smolvlm-256m --chat --image cat.jpg
    python board/run.py --bundle out/bundle --emulate --json --image a.jpg --image b.jpg "Compare them."

Runs from a copied folder (the parent of board/ is put on sys.path) and as the installed
`smolvlm-run` command. Errors are one plain message on stderr and a non-zero exit status; what
can be checked before the model loads (text that is not UTF-8, sampling values no backend takes,
files that are not regular files) is checked first. In --chat a bad line is refused and the
conversation goes on.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import textwrap
import threading
from pathlib import Path
from typing import Any, Optional, Sequence, TextIO

if __package__ in (None, ""):  # run as a script (python board/run.py): board/_script_path.py fixes sys.path
    import runpy

    runpy.run_path(str(Path(__file__).with_name("_script_path.py")))

from board.decoder import DEFAULT_TOP_K, SamplingParams  # noqa: E402
from board.decoder_rkllm import add_embed_flash_option  # noqa: E402
from board.errors import InputError, SmolVLMError  # noqa: E402
from board.image_io import require_regular_file  # noqa: E402
from board.prompt import CONTROL_TOKEN_POLICIES  # noqa: E402
from board.system_checks import exit_status, run_checks  # noqa: E402
from board.tiles import check_tile_budget  # noqa: E402
from board.vision import NPU_CORE_MODES  # noqa: E402

EXIT_ERROR, EXIT_USAGE, EXIT_INTERRUPTED = 1, 2, 130


class _UsageError(Exception):
    """Arguments that parse but do not make sense together; reported like argparse's own errors."""


class _NotText(Exception):
    """A line of input that is not valid UTF-8 text."""


CHAT_HELP = """In --chat: /image PATH attaches an image to the next message, /video PATH a video,
/reset starts a new conversation, /quit (or Ctrl-D) ends; any other /word is refused (start a
message with // to send one that begins with /). Ctrl-C stops an answer; Ctrl-C again (or at the
prompt) exits. A conversation that outgrows the model's context starts over with the new message,
and a notice on stderr says so."""
COMMANDS = ("/image", "/video", "/reset", "/help", "/quit", "/exit")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=textwrap.dedent("""\
            Ask a SmolVLM bundle about images or a video; the answer streams to stdout.
            On an RK3588 the vision model runs on the NPU (rknnlite) and the language model in
            librkllmrt; with --emulate the same pipeline runs on x86 with ONNX Runtime and PyTorch
            on the bundle's host/ files. Board checks (NPU driver, runtimes) run first."""),
        epilog=textwrap.dedent(f"""\
            Greedy decoding is the default (reproducible answers). --temperature > 0 or --top-p < 1
            turns sampling on (top-k {DEFAULT_TOP_K} unless --top-k is given).

            Exit status: 0 done, {EXIT_ERROR} error, {EXIT_USAGE} bad arguments, {EXIT_INTERRUPTED} interrupted.

            """) + CHAT_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("question", nargs="?", help="the question (with --chat: the first message; optional)")
    parser.add_argument("--bundle", required=True, metavar="DIR", help="the bundle folder made by host.convert")
    parser.add_argument("--image", action="append", default=[], metavar="PATH",
                        help="an image (JPEG, PNG, WebP, BMP, GIF, TIFF); repeat for several, in prompt order")
    parser.add_argument("--video", metavar="PATH", help="a video file (SmolVLM2 bundles): frames are sampled "
                        "at the model's rate and limits")
    parser.add_argument("--system", metavar="TEXT", help="a system message")
    parser.add_argument("--chat", action="store_true", help="interactive conversation; the model keeps the "
                        "history in its cache and each turn feeds only its new tokens")
    parser.add_argument("--json", action="store_true", help="print one JSON object (text, token_ids, "
                        "finish_reason, timings, model) instead of streaming; with --chat one object per turn")
    parser.add_argument("--emulate", action="store_true", help="x86 emulation: ONNX Runtime vision + PyTorch "
                        "decoder from <bundle>/host/ (works on a bundle converted with --skip-decoder)")
    parser.add_argument("--no-verify", action="store_true", help="skip the sha256 check of the bundle's files "
                        "(faster start; a damaged file then fails later and less clearly)")
    parser.add_argument("--npu-cores", choices=NPU_CORE_MODES, default="parallel",
                        help="vision on the NPU: 'parallel' = one runtime per core, tiles spread over the 3 "
                        "cores (default); 'single' = core 0 only; 'all' = one runtime across all 3 cores")
    parser.add_argument("--max-tiles", type=int, metavar="N", help="tile budget per image, global view "
                        "included: default the model's full splitting (up to 17); fewer tiles are faster "
                        "(e.g. 5 = 2x2 + global), 1 = no splitting")
    parser.add_argument("--max-new-tokens", type=int, default=512, metavar="N", help="answer length limit (512)")
    parser.add_argument("--temperature", type=float, metavar="T", help="sampling temperature (0 = greedy)")
    parser.add_argument("--top-k", type=int, metavar="K", help="sample from the K most likely tokens (1 = greedy)")
    parser.add_argument("--top-p", type=float, metavar="P", help="nucleus sampling: smallest set of tokens with "
                        "probability >= P")
    parser.add_argument("--repeat-penalty", type=float, default=1.0, metavar="R",
                        help="divide the scores of tokens already in the answer by R (1.0 = off)")
    parser.add_argument("--seed", type=int, help="random seed for sampling, a 64-bit integer (emulation; "
                        "librkllmrt has none)")
    parser.add_argument("--control-tokens", choices=CONTROL_TOKEN_POLICIES, default="special",
                        help="what special-token strings typed in the text become: 'special' (default) the model's "
                        "control tokens, as transformers tokenizes them (reference parity); 'text' plain text, so "
                        "text pasted from elsewhere cannot end a turn or start a new one")
    parser.add_argument("--checks", action="store_true",
                        help="only run the system checks, print them and exit with the status of the first "
                             "missing piece (python -m board.system_checks --help lists them)")
    parser.add_argument("--stats", action="store_true", help="print the timings to stderr after each answer")
    parser.add_argument("--vision-fallback", action="store_true", help="use the bundle's fallback vision model "
                        "(fp16, Rockchip's conv input layout; host.convert --vision-fallback) instead of the main one")
    add_embed_flash_option(parser)
    return parser


def text_problem(text: str) -> Optional[str]:
    """Why `text` is not valid Unicode text (bytes that were not UTF-8 arrive as lone surrogates), or None."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        bad = text[exc.start]
        detail = f"byte {ord(bad) - 0xDC00:#04x}" if 0xDC80 <= ord(bad) <= 0xDCFF else f"U+{ord(bad):04X}"
        return f"is not valid UTF-8 text ({detail} at character {exc.start})"
    return None


def read_line(prompt: str, interactive: bool) -> Optional[str]:
    """The next line of input without its newline, None at the end; _NotText for a line that is not
    UTF-8 (read as bytes when piped, so one bad line cannot spoil the lines after it)."""
    if interactive:
        try:
            line = input(prompt)
        except EOFError:
            return None
        except UnicodeDecodeError as exc:
            raise _NotText(f"is not valid UTF-8 text (byte {exc.object[exc.start]:#04x})") from None
    else:
        stream = getattr(sys.stdin, "buffer", None)
        raw = stream.readline() if stream is not None else sys.stdin.readline()
        if not raw:
            return None
        if isinstance(raw, bytes):
            try:
                raw = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise _NotText(f"is not valid UTF-8 text (byte {raw[exc.start]:#04x} at byte {exc.start})") from None
        line = raw.rstrip("\r\n")
    problem = text_problem(line)
    if problem is not None:
        raise _NotText(problem)
    return line


def sampling_from_args(args: argparse.Namespace) -> SamplingParams:
    sampling_wanted = (args.temperature or 0) > 0 or (args.top_p is not None and args.top_p < 1)
    top_k = args.top_k if args.top_k is not None else (DEFAULT_TOP_K if sampling_wanted else 1)
    return SamplingParams(
        max_new_tokens=args.max_new_tokens,
        top_k=top_k,
        top_p=args.top_p if args.top_p is not None else 1.0,
        temperature=args.temperature if args.temperature is not None else 1.0,
        repeat_penalty=args.repeat_penalty,
        seed=args.seed,
    )


class Interrupts:
    """Ctrl-C during a turn: the first stops it (the pipeline aborts; images being encoded finish
    first), the second raises KeyboardInterrupt and the command exits."""

    def __init__(self, pipeline: Any):
        self.pipeline = pipeline
        self.count = 0
        self._previous: Any = None

    def _handle(self, signum: int, frame: Any) -> None:
        self.count += 1
        if self.count > 1:
            raise KeyboardInterrupt
        self.pipeline.abort()

    def __enter__(self) -> "Interrupts":
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)


def stream(reply: Any, pipeline: Any, *, as_json: bool, out: TextIO, stats: bool) -> Any:
    """Print one answer (streamed text, or one JSON object); return the Answer."""
    for notice in reply.notices:
        print(f"notice: {notice}", file=sys.stderr)
    for step in reply:
        if step.text and not as_json:
            out.write(step.text)
            out.flush()
    answer = reply.answer
    if as_json:
        out.write(json.dumps({**answer.to_dict(), "model": pipeline.describe()}, ensure_ascii=False) + "\n")
    else:
        out.write("\n")
        if answer.finish_reason == "abort":
            print("(stopped)", file=sys.stderr)
    out.flush()
    if stats:
        t = answer.timings
        print(f"[{t.tiles} tiles, vision {t.vision_ms_per_tile:.0f} ms/tile, prefill {t.prompt_tokens} tok "
              f"{t.prefill_ms:.0f} ms, ttft {t.ttft_ms:.0f} ms, decode {t.decode_tok_s:.1f} tok/s, "
              f"peak RSS {t.peak_rss_mb:.0f} MB]", file=sys.stderr)
    return answer


def chat_loop(pipeline: Any, args: argparse.Namespace, sampling: SamplingParams, out: TextIO) -> int:
    chat = pipeline.chat(args.system)
    images: list[str] = list(args.image)
    video: Optional[str] = args.video
    first: Optional[str] = args.question  # the command line's question is a message, never a /command
    interactive = sys.stdin.isatty()
    if interactive and not args.json:
        print(f"chatting with {pipeline.bundle.model_id}\n{CHAT_HELP}", file=sys.stderr)
    while True:
        if first is not None:
            line, first = first.strip(), None
        else:
            try:
                typed = read_line("> " if interactive else "", interactive)
            except _NotText as err:
                print(f"error: that line {err}; it was not sent", file=sys.stderr)
                continue
            except KeyboardInterrupt:
                print(file=sys.stderr)
                return EXIT_INTERRUPTED
            if typed is None:
                return 0
            line = typed.strip()
            if line.startswith("//"):
                line = line[1:]  # a message that begins with /
            elif line.startswith("/"):
                command, _, rest = line.partition(" ")
                if command not in COMMANDS:
                    print(f"error: unknown command {command} (commands: {', '.join(COMMANDS)}; start the line "
                          "with // to send it as a message)", file=sys.stderr)
                    continue
                if command in ("/quit", "/exit"):
                    return 0
                if command == "/help":
                    print(CHAT_HELP, file=sys.stderr)
                elif command == "/reset":
                    chat.reset()
                    images, video = [], None
                    print("(new conversation)", file=sys.stderr)
                else:
                    path = rest.strip()
                    try:
                        if not path:
                            raise InputError(f"usage: {command} PATH")
                        require_regular_file(path, command[1:])
                    except InputError as err:
                        print(f"error: {err}", file=sys.stderr)
                        continue
                    if command == "/image":
                        images.append(path)
                        print(f"(image {len(images)} attached to the next message)", file=sys.stderr)
                    else:
                        video = path
                        print("(video attached to the next message)", file=sys.stderr)
                continue
        if not line:
            continue
        try:
            with Interrupts(pipeline):
                reply = chat.send(line, images, video=video, sampling=sampling, max_tiles=args.max_tiles,
                                  on_overflow="reset")
                images, video = [], None
                stream(reply, pipeline, as_json=args.json, out=out, stats=args.stats)
        except KeyboardInterrupt:
            print("\n(interrupted)", file=sys.stderr)
            return EXIT_INTERRUPTED
        except InputError as err:  # a bad image or prompt loses only that message
            print(f"error: {err}", file=sys.stderr)
            images, video = [], None


def check_args(args: argparse.Namespace) -> SamplingParams:
    """Everything about the arguments that can be checked before the model loads; the sampling."""
    try:
        check_tile_budget(args.max_tiles)
    except InputError as err:
        raise _UsageError(f"--max-tiles: {err}") from None
    if not args.chat and not args.question:
        raise _UsageError("give a question (or use --chat)")
    for name, text in (("the question", args.question), ("--system", args.system)):
        problem = text_problem(text) if text is not None else None
        if problem is not None:
            raise _UsageError(f"{name} {problem}")
    sampling = sampling_from_args(args)
    problem = sampling.problem()
    if problem is not None:
        raise _UsageError(f"--{problem[0].replace('_', '-')}: {problem[1]}")
    for path in args.image:
        require_regular_file(path, "image")
    if args.video is not None:
        require_regular_file(args.video, "video")
    return sampling


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    out = sys.stdout
    if args.emulate:
        os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")  # the CLI's stderr is for the user
    try:
        if args.checks:
            results = run_checks(emulate=args.emulate, library_dirs=[args.bundle])
            for result in results:
                print(result.line(), file=out)
            return exit_status(results)
        sampling = check_args(args)
        from board.pipeline import Pipeline

        with Pipeline(args.bundle, emulate=args.emulate, verify=not args.no_verify, npu_cores=args.npu_cores,
                      max_tiles=args.max_tiles, sampling=sampling, vision_fallback=args.vision_fallback,
                      control_tokens=args.control_tokens, embed_flash=args.embed_flash) as pipeline:
            if args.chat:
                return chat_loop(pipeline, args, sampling, out)
            with Interrupts(pipeline):
                reply = pipeline.ask(args.question, args.image, video=args.video, system=args.system,
                                     sampling=sampling, max_tiles=args.max_tiles)
                answer = stream(reply, pipeline, as_json=args.json, out=out, stats=args.stats)
            return EXIT_INTERRUPTED if answer.finish_reason == "abort" else 0
    except _UsageError as err:
        print(f"smolvlm-run: error: {err}", file=sys.stderr)
        return EXIT_USAGE
    except SmolVLMError as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        print("\n(interrupted)", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception as err:  # a bug, not a user error: one line unless SMOLVLM_DEBUG asks for the traceback
        if os.environ.get("SMOLVLM_DEBUG"):
            raise
        print(f"error: internal error (a bug, please report it): {type(err).__name__}: {err} "
              "(set SMOLVLM_DEBUG=1 for the traceback)", file=sys.stderr)
        return EXIT_ERROR


if __name__ == "__main__":
    sys.exit(main())
