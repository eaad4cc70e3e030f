"""`python board/run.py` as a user runs it: a subprocess, from the repository and from a copied folder.

Emulation on a tiny bundle: the --json answer equals transformers' generate(); chat over stdin; Ctrl-C
stops an answer and a second one exits; every error is one plain message with a non-zero status.
"""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytest.importorskip("torch")
pytest.importorskip("onnxruntime")

from board.errors import ImageError, PromptError  # noqa: E402
from board.run import build_parser, main, sampling_from_args  # noqa: E402
from support import ROOT, Oracle, json_answer, run_cli  # noqa: E402

Q = "What is in this image?"


def _error_line(result, status=1):
    assert result.returncode == status, (result.returncode, result.stdout, result.stderr)
    assert "Traceback" not in result.stderr
    return result.stderr


def test_json_answer_equals_reference_generate(bundle, images, tiny_checkpoint):
    result = run_cli("--bundle", str(bundle), "--emulate", "--json", "--max-new-tokens", "12",
                     "--image", str(images["wide"]), "--image", str(images["small"]), Q)
    answer = json_answer(result)
    assert result.stdout.count("\n") == 1  # one JSON object
    oracle = Oracle(tiny_checkpoint("256m"))
    inputs = oracle.inputs([{"role": "user", "content": [{"type": "image"}, {"type": "image"},
                                                          {"type": "text", "text": Q}]}], [images["wide"], images["small"]])
    assert answer["token_ids"] == oracle.generate(inputs, 12)
    assert answer["tiles_per_image"] == [13, 17]
    timings = answer["timings"]
    for key in ("load_ms", "tiles_ms", "vision_ms_per_tile", "prefill_ms", "prefill_tok_s", "decode_tok_s",
                "ttft_ms", "peak_rss_mb", "prompt_tokens"):
        assert timings[key] > 0, key
    assert answer["model"]["vision"] == "onnxruntime" and answer["model"]["decoder"] == "TorchDecoder"
    assert isinstance(answer["text"], str) and answer["finish_reason"] in ("stop", "length")


def test_runs_from_a_copied_folder(bundle, tmp_path):
    """board/ copied anywhere runs as a script, importing its own package (not the repository's)."""
    app = tmp_path / "app"
    shutil.copytree(ROOT / "board", app / "board", ignore=shutil.ignore_patterns("__pycache__"))
    (app / "board" / "MARK").write_text("copy")
    probe = ("import sys, runpy; sys.argv = [sys.argv[1], '--help']; "
             "import atexit; atexit.register(lambda: print('BOARD_FROM', sys.modules['board'].__file__)); "
             "runpy.run_path(sys.argv[0], run_name='__main__')")
    result = subprocess.run([sys.executable, "-c", probe, str(app / "board" / "run.py")], capture_output=True,
                            text=True, cwd=tmp_path)
    assert f"BOARD_FROM {app / 'board' / '__init__.py'}" in result.stdout, result.stdout + result.stderr
    answer = json_answer(subprocess.run(
        [sys.executable, str(app / "board" / "run.py"), "--bundle", str(bundle), "--emulate", "--json",
         "--max-new-tokens", "3", "Hello"], capture_output=True, text=True, cwd=tmp_path))
    assert len(answer["token_ids"]) <= 3


@pytest.mark.parametrize("script", ["run.py", "serve.py", "bench.py"])
def test_every_board_script_imports_its_copied_package(tmp_path, script):
    """The three scripts share one sys.path bootstrap (board/_script_path.py): each finds the copy's package."""
    app = tmp_path / "app"
    shutil.copytree(ROOT / "board", app / "board", ignore=shutil.ignore_patterns("__pycache__"))
    probe = ("import sys, runpy; sys.argv = [sys.argv[1], '--help']; "
             "import atexit; atexit.register(lambda: print('BOARD_FROM', sys.modules['board'].__file__)); "
             "runpy.run_path(sys.argv[0], run_name='__main__')")
    result = subprocess.run([sys.executable, "-c", probe, str(app / "board" / script)], capture_output=True,
                            text=True, cwd=tmp_path)
    assert "--bundle" in result.stdout, result.stderr
    assert f"BOARD_FROM {app / 'board' / '__init__.py'}" in result.stdout, result.stdout + result.stderr


def test_console_entry_point_is_declared_and_installed():
    cfg = (ROOT / "setup.cfg").read_text()
    assert "smolvlm-run = board.run:main" in cfg
    script = shutil.which("smolvlm-run", path=str(Path(sys.executable).parent))
    if script is None:
        pytest.skip("the package is not installed in this environment (scripts/setup.sh installs it)")
    result = subprocess.run([script, "--help"], capture_output=True, text=True)
    assert result.returncode == 0 and "--emulate" in result.stdout


def test_help_explains_the_flags():
    text = build_parser().format_help()
    for flag in ("--bundle", "--image", "--video", "--chat", "--json", "--emulate", "--no-verify", "--npu-cores",
                 "--max-tiles", "--max-new-tokens", "--temperature", "--top-k", "--top-p", "--repeat-penalty",
                 "--seed", "/image PATH", "/reset", "Ctrl-C"):
        assert flag in text, flag


def test_sampling_flags():
    parse = build_parser().parse_args
    greedy = sampling_from_args(parse(["--bundle", "b", "q"]))
    assert greedy.greedy and greedy.max_new_tokens == 512
    sampled = sampling_from_args(parse(["--bundle", "b", "--temperature", "0.7", "--top-p", "0.9", "--seed", "3",
                                        "--repeat-penalty", "1.1", "q"]))
    assert not sampled.greedy and (sampled.top_k, sampled.top_p, sampled.temperature, sampled.seed,
                                   sampled.repeat_penalty) == (40, 0.9, 0.7, 3, 1.1)
    assert sampling_from_args(parse(["--bundle", "b", "--temperature", "0.7", "--top-k", "1", "q"])).greedy


def test_seeded_sampling_is_reproducible(bundle):
    args = ["--bundle", str(bundle), "--emulate", "--no-verify", "--temperature", "0.9", "--seed", "7",
            "--max-new-tokens", "6", "Tell me a story."]
    outputs = []
    for _ in range(2):
        buffer = _capture(main, [*args, "--json"])
        outputs.append(json.loads(buffer)["token_ids"])
    assert outputs[0] == outputs[1] and len(outputs[0]) >= 1


def _capture(fn, argv):
    import io
    from contextlib import redirect_stdout

    out = io.StringIO()
    with redirect_stdout(out):
        assert fn(argv) == 0
    return out.getvalue()


@pytest.mark.parametrize("case", ["missing-bundle", "not-an-image", "missing-image", "prompt-too-long",
                                  "no-question", "no-tiles", "not-a-board"])
def test_errors_are_one_plain_message(case, bundle, images, tmp_path, capsys):
    not_image = tmp_path / "notes.jpg"
    not_image.write_text("this is not a picture")
    base = ["--bundle", str(bundle), "--emulate", "--no-verify"]
    argv, expected, status = {
        "missing-bundle": (["--bundle", str(tmp_path / "nope"), "--emulate", "hi"], "bundle folder not found", 1),
        "not-an-image": ([*base, "--image", str(not_image), "hi"], "not an image", 1),
        "missing-image": ([*base, "--image", str(tmp_path / "gone.png"), "hi"], "image file not found", 1),
        "prompt-too-long": ([*base, *["--image", str(images["wide"])] * 5, "hi"],
                            "tokens but the model's context holds 4095", 1),
        "no-question": ([*base], "give a question", 2),
        "no-tiles": ([*base, "--max-tiles", "0", "hi"], "--max-tiles: the tile budget must be at least 1", 2),
        # without --emulate on x86 the board checks speak first (a bundle without decoder.rkllm: test_bundle)
        "not-a-board": (["--bundle", str(bundle), "hi"], "this machine cannot run the model: cpu:", 1),
    }[case]
    if case == "missing-bundle":  # one of them as a real subprocess; the rest in-process (no torch start-up each)
        stderr = _error_line(run_cli(*argv), status)
    else:
        assert main(argv) == status
        stderr = capsys.readouterr().err
        assert "Traceback" not in stderr
    first = stderr.strip().splitlines()[0]
    assert expected in first, stderr
    assert len(stderr.strip().splitlines()) <= 2  # the message, and a hint line when there is one


def test_api_errors_are_typed(bundle, images, tmp_path):
    from board.pipeline import Pipeline

    with Pipeline(bundle, emulate=True, verify=False) as pipeline:
        with pytest.raises(ImageError):
            pipeline.ask("hi", [tmp_path / "gone.png"])
        with pytest.raises(PromptError):
            pipeline.ask("hi", [images["wide"]] * 5)


def test_chat_over_stdin(bundle, images):
    script = f"/image {images['small']}\n{Q}\nAnd the colours?\n/reset\nHello.\n"
    result = subprocess.run(
        [sys.executable, str(ROOT / "board" / "run.py"), "--bundle", str(bundle), "--emulate", "--no-verify",
         "--chat", "--json", "--max-new-tokens", "4"],
        input=script, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert result.returncode == 0, result.stderr
    turns = [json.loads(line) for line in result.stdout.splitlines()]
    assert len(turns) == 3
    assert turns[0]["tiles_per_image"] == [17] and turns[0]["timings"]["history_tokens"] == 0
    assert turns[1]["tiles_per_image"] == [] and turns[1]["timings"]["history_tokens"] > 0
    assert turns[2]["timings"]["history_tokens"] == 0  # /reset started over

    from board.pipeline import Pipeline
    from board.decoder import SamplingParams

    with Pipeline(bundle, emulate=True, verify=False) as pipeline:
        chat = pipeline.chat()
        params = SamplingParams(max_new_tokens=4)
        expected = [chat.send(Q, [images["small"]], sampling=params).collect().token_ids,
                    chat.send("And the colours?", sampling=params).collect().token_ids]
    assert [t["token_ids"] for t in turns[:2]] == expected


def _start_long_answer(bundle, extra=()):
    process = subprocess.Popen(
        [sys.executable, str(ROOT / "board" / "run.py"), "--bundle", str(bundle), "--emulate", "--no-verify",
         "--max-new-tokens", "3000", *extra],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)
    return process


def _wait_for_output(process, timeout=120):
    import os
    import select

    deadline = time.monotonic() + timeout
    fd = process.stdout.fileno()
    while time.monotonic() < deadline:
        ready, _, _ = select.select([fd], [], [], 0.5)
        if ready and os.read(fd, 1):
            return
        assert process.poll() is None, process.stderr.read()
    raise AssertionError("no answer text within the timeout")


def _drain(process):
    import os
    import select

    fd = process.stdout.fileno()
    while select.select([fd], [], [], 0.5)[0] and os.read(fd, 4096):
        pass


def test_ctrl_c_stops_the_answer(bundle):
    process = _start_long_answer(bundle, ["Tell me a very long story."])
    _wait_for_output(process)
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == 130 and "(stopped)" in stderr and "Traceback" not in stderr


def test_ctrl_c_in_chat_stops_the_answer_then_a_second_exits(bundle):
    process = _start_long_answer(bundle, ["--chat"])
    process.stdin.write("Tell me a very long story.\n")
    process.stdin.flush()
    _wait_for_output(process)
    process.send_signal(signal.SIGINT)
    time.sleep(1.0)
    assert process.poll() is None  # the first Ctrl-C only stopped the answer
    _drain(process)
    process.stdin.write("Tell me another one.\n")
    process.stdin.flush()
    _wait_for_output(process)
    process.send_signal(signal.SIGINT)
    time.sleep(0.2)
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == 130 and stderr.count("(stopped)") >= 1 and "Traceback" not in stderr


# -- input rules: checked before the model loads, one plain line each ---------------------------------


@pytest.mark.parametrize("argv, expected", [
    (["--max-new-tokens", "0", "hi"], "--max-new-tokens: max_new_tokens must be at least 1, got 0"),
    (["--seed", str(1 << 64), "hi"], "--seed: seed must be a 64-bit integer"),
    (["--temperature", "1e-300", "hi"], "--temperature: temperature must be 0 (greedy) or at least 0.001"),
    (["--temperature", "nan", "hi"], "--temperature: temperature must be 0 (greedy) or at least"),
    (["--top-p", "0", "hi"], "--top-p: top_p must be between 0.001 and 1"),
    (["--top-k", "-1", "hi"], "--top-k: top_k must be 0 (off) or more"),
    (["--repeat-penalty", "0", "hi"], "--repeat-penalty: repeat_penalty must be greater than 0"),
    (["--system", "a\udcffb", "hi"], "--system is not valid UTF-8 text (byte 0xff at character 1)"),
])
def test_bad_values_are_usage_errors_before_the_model_loads(argv, expected, tmp_path, capsys):
    assert main(["--bundle", str(tmp_path / "not-loaded"), *argv]) == 2  # the bundle is never opened
    err = capsys.readouterr().err
    assert expected in err and "Traceback" not in err and len(err.strip().splitlines()) == 1, err


def test_files_that_are_not_regular_files_are_refused_before_the_model_loads(tmp_path, capsys):
    import os

    fifo = tmp_path / "pipe.png"
    os.mkfifo(fifo)
    for argv, expected in ((["--image", str(fifo)], "is a FIFO (named pipe), not a regular image file"),
                           (["--image", "/dev/zero"], "/dev/zero is a character device, not a regular image file"),
                           (["--video", str(tmp_path)], "is a folder, not a regular video file")):
        assert main(["--bundle", str(tmp_path / "not-loaded"), *argv, "hi"]) == 1
        err = capsys.readouterr().err
        assert expected in err and "Traceback" not in err, err


def test_a_question_that_is_not_utf8_is_a_usage_error():
    result = subprocess.run([sys.executable, str(ROOT / "board" / "run.py"), "--bundle", "nowhere", b"caf\xe9?"],
                            capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert result.returncode == 2 and "the question is not valid UTF-8 text (byte 0xe9 at character 3)" in result.stderr
    assert "Traceback" not in result.stderr


def test_chat_refuses_bad_lines_and_unknown_commands_and_goes_on(bundle, tmp_path, monkeypatch, capsys):
    import io
    import os

    fifo = tmp_path / "pipe.png"
    os.mkfifo(fifo)
    script = (b"caf\xe9 au lait?\n/imgae cat.png\n/image " + str(fifo).encode() + b"\n/image\n"
              b"//slash is a message\n/quit\n")
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(script)))  # piped bytes, as from a file
    status = main(["--bundle", str(bundle), "--emulate", "--no-verify", "--chat", "--json", "--max-new-tokens", "2"])
    out, stderr = capsys.readouterr()
    assert status == 0 and "Traceback" not in stderr, stderr
    assert "error: that line is not valid UTF-8 text (byte 0xe9 at byte 3); it was not sent" in stderr
    assert "error: unknown command /imgae" in stderr and "is a FIFO" in stderr and "usage: /image PATH" in stderr
    turns = [json.loads(line) for line in out.splitlines()]
    assert len(turns) == 1  # only "//slash is a message" reached the model, as "/slash is a message"
    assert turns[0]["timings"]["history_tokens"] == 0


def test_control_tokens_flag(bundle):
    """--control-tokens text: a pasted '<end_of_utterance>' stays text (more prompt tokens than as one special)."""
    question = "Say<end_of_utterance> hi"
    counts = {}
    for policy in ("special", "text"):
        counts[policy] = json.loads(_capture(main, ["--bundle", str(bundle), "--emulate", "--no-verify", "--json",
                                                    "--max-new-tokens", "1", "--control-tokens", policy, question])
                                    )["timings"]["prompt_tokens"]
    assert counts["text"] > counts["special"]


def test_embed_flash_flag_reaches_the_pipeline(bundle, monkeypatch, capsys):
    """--embed-flash / --no-embed-flash override the bundle's default; without either the pipeline is given None."""
    import board.pipeline

    seen = []

    class Recorder:
        def __init__(self, *args, **kwargs):
            seen.append(kwargs["embed_flash"])
            raise PromptError("stop here")

    monkeypatch.setattr(board.pipeline, "Pipeline", Recorder)
    for flags in ([], ["--embed-flash"], ["--no-embed-flash"]):
        assert main(["--bundle", str(bundle), "--emulate", *flags, "hi"]) != 0
    assert seen == [None, True, False]
    assert "stop here" in capsys.readouterr().err
