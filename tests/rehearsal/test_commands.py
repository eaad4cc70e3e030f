"""The board commands start from the copied folder, and a user's first run ends in a plain message."""

from __future__ import annotations

import json
import subprocess

import pytest

pytestmark = pytest.mark.rehearsal

HELP_COMMANDS = {
    "board/run.py --help": ["board/run.py", "--help"],
    "-m board.run --help": ["-m", "board.run", "--help"],
    "board/serve.py --help": ["board/serve.py", "--help"],
    "board/bench.py --help": ["board/bench.py", "--help"],
    "-m board.system_checks --help": ["-m", "board.system_checks", "--help"],
    "-m board run --help": ["-m", "board", "run", "--help"],
    "-m board checks --help": ["-m", "board", "checks", "--help"],
    "-m board batch --help": ["-m", "board", "batch", "--help"],
    "-m board doctor --help": ["-m", "board", "doctor", "--help"],
}


@pytest.mark.parametrize("name", list(HELP_COMMANDS))
def test_help(rehearsal, record_property, name):
    done = subprocess.run([rehearsal.python, *HELP_COMMANDS[name]], cwd=rehearsal.dest, capture_output=True,
                          text=True, timeout=300)
    record_property("command", json.dumps({"command": f"python {name}", "exit": done.returncode}))
    assert done.returncode == 0, done.stderr
    assert "usage:" in done.stdout
    assert "Traceback" not in done.stdout + done.stderr


def test_first_question_on_an_unprepared_board_is_a_plain_error(rehearsal, record_property):
    """What a user sees asking a question before anything is in place: one message, no traceback."""
    image = next(p for p in sorted((rehearsal.data / "images").iterdir()))
    done = subprocess.run(
        [rehearsal.python, "board/run.py", "--bundle", str(rehearsal.bundle), "--image", str(image), "What is it?"],
        cwd=rehearsal.dest, capture_output=True, text=True, timeout=300)
    record_property("command", json.dumps({"command": "python board/run.py --bundle ... --image ... QUESTION",
                                           "exit": done.returncode, "message": done.stderr.strip()}))
    assert done.returncode == 1
    assert done.stderr.startswith("error: ") and "Traceback" not in done.stdout + done.stderr
