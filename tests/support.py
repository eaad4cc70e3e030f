"""Helpers the test modules share (not a test module): tiny bundles converted once per session with
host.convert, the transformers oracle beside them, test images and the CLI runner.
The fixtures built on them (`tiny_checkpoint`, `bundle`, `images`) are in conftest.py.

`python -m host.convert --skip-decoder` makes what an x86 user has: the board files (a real fp16
vision.rknn, never run here), host/vision.onnx and host/decoder, which emulation runs.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parent.parent
_BUILT: dict[str, Any] = {}
CHAT_QUESTION = "What is in this image?"


def skip_without_rknn_toolkit() -> None:
    """Skip the calling test module, with the reason, where rknn-toolkit2 cannot run (the vision build needs it)."""
    try:
        from host.vision_rknn import require_rknn_toolkit

        require_rknn_toolkit()
    except Exception as exc:
        pytest.skip(f"rknn-toolkit2 unavailable: {exc}", allow_module_level=True)


def convert_bundle(checkpoint_path: Path, out: Path) -> Path:
    """host.convert on a checkpoint folder, as a user runs it on x86 (no rkllm-toolkit: --skip-decoder)."""
    from host import convert

    assert convert.main(["--model", str(checkpoint_path), "--out", str(out), "--skip-decoder", "--quiet"]) == 0
    return out


def tiny_bundle_for(tmp_path_factory: Any, tiny_checkpoint: Any, family: str = "256m") -> Path:
    """The bundle of the conftest's tiny checkpoint, converted once per session and shared by every module."""
    key = f"plain-{family}"
    if key not in _BUILT:
        _BUILT[key] = convert_bundle(tiny_checkpoint(family), tmp_path_factory.mktemp(f"bundle-{family}"))
    return _BUILT[key]


def stopping_video_setup(tmp_path_factory: Any, tiny_checkpoint: Any, image: Path) -> SimpleNamespace:
    """A variant of the tiny 256m checkpoint that answers like a real model and takes video like SmolVLM2.

    - Its greedy answer to the first chat turn (CHAT_QUESTION about `image`) ends with the end-of-turn
      token after a few tokens: the lm_head row of <end_of_utterance> is set to that of the token the
      plain model would say 4th (scaled up), so the end token wins where that one would.
    - Its preprocessor settings carry SmolVLM2's `video_sampling`, so host.convert writes the video section.
    Returns (checkpoint, bundle) paths.
    """
    if "variant" not in _BUILT:
        import shutil

        import torch

        from host.checkpoint import load_checkpoint

        base = Oracle(tiny_checkpoint("256m"))
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": CHAT_QUESTION}]}]
        generated = base.generate(base.inputs(messages, [image]), 6)
        token = next(t for i, t in enumerate(generated) if i >= 3 and t not in generated[:i])
        root = tmp_path_factory.mktemp("variant")
        checkpoint = root / "checkpoint"
        shutil.copytree(base.checkpoint.path, checkpoint)
        eos = base.processor.tokenizer.eos_token_id
        with torch.no_grad():
            base.model.lm_head.weight[eos] = base.model.lm_head.weight[token] * 1.05
        base.model.save_pretrained(checkpoint)
        preprocessor = json.loads((checkpoint / "preprocessor_config.json").read_text())
        preprocessor["video_sampling"] = {"fps": 1, "max_frames": 64, "video_size": {"longest_edge": 512}}
        (checkpoint / "preprocessor_config.json").write_text(json.dumps(preprocessor, indent=2))
        load_checkpoint(checkpoint)  # still a valid checkpoint
        _BUILT["variant"] = SimpleNamespace(checkpoint=checkpoint, bundle=convert_bundle(checkpoint, root / "bundle"))
    return _BUILT["variant"]


class Oracle:
    """transformers' own processor and model for a tiny checkpoint: what the board must reproduce."""

    def __init__(self, checkpoint_path: Path):
        from host.checkpoint import load_checkpoint

        ck = load_checkpoint(checkpoint_path)
        self.checkpoint = ck
        self.processor = ck.load_processor()
        self.model = ck.load_model()

    def inputs(self, messages: list, images: list, **processor_kwargs: Any) -> Any:
        from PIL import Image

        text = self.processor.apply_chat_template(messages, add_generation_prompt=True)
        pil = [Image.open(p).convert("RGB") for p in images]
        return self.processor(text=text, images=pil or None, return_tensors="pt", **processor_kwargs)

    def generate(self, inputs: Any, max_new_tokens: int) -> list[int]:
        import torch

        with torch.no_grad():
            out = self.model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
        return out[0, inputs["input_ids"].shape[1]:].tolist()

    def inputs_embeds(self, inputs: Any) -> np.ndarray:
        """The reference's merged sequence (text embeddings with the image features scattered in)."""
        import torch

        inner = self.model.model
        with torch.no_grad():
            embeds = inner.get_input_embeddings()(inputs["input_ids"])
            if "pixel_values" in inputs:
                feats = inner.get_image_features(inputs["pixel_values"], inputs.get("pixel_attention_mask")).pooler_output
                embeds = inner.inputs_merger(inputs["input_ids"], embeds, torch.cat(list(feats)))
        return embeds[0].numpy()


def run_cli(*args: str, cwd: Path | None = None, timeout: float = 300) -> Any:
    """`python board/run.py ...` as a subprocess, the way a user runs it from a copied folder."""
    import os
    import subprocess

    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}  # the script must find its package itself
    return subprocess.run([sys.executable, str(ROOT / "board" / "run.py"), *args], capture_output=True, text=True,
                          timeout=timeout, cwd=cwd or ROOT, env=env)


def photo_pixels(h: int, w: int, seed: int = 0) -> np.ndarray:
    """Photo-like HxWx3 uint8 pixels (smooth fields + noise), so tiles differ from each other."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    img = np.stack([128 + 90 * np.sin(x / (31 + seed) + y / 97), 128 + 90 * np.cos(y / 29 - x / 300),
                    128 + 70 * np.sin((x - y) / 17)], -1) + rng.normal(0, 12, (h, w, 3))
    return np.clip(img, 0, 255).astype(np.uint8)


def write_image(path: Path, h: int, w: int, seed: int) -> Path:
    """A photo-like PNG (photo_pixels)."""
    from PIL import Image

    Image.fromarray(photo_pixels(h, w, seed)).save(path)
    return path



C_DIR = ROOT / "tests" / "c"
STANDIN_RKLLM = ROOT / "tests" / "standin_rkllm"  # the stand-in rkllm-toolkit, put on PYTHONPATH by the tests that use it


def compile_fake_rkllmrt(out: Path, *defines: str) -> Path:
    """The C test double of librkllmrt (tests/c/fake_rkllmrt.c), built with gcc from our own declarations."""
    import subprocess

    subprocess.run(
        ["gcc", "-shared", "-fPIC", "-fvisibility=hidden", "-O1", "-Wall", "-Wextra", "-Werror", "-pthread",
         *defines, f"-I{C_DIR}", str(C_DIR / "fake_rkllmrt.c"), "-o", str(out)],
        check=True, capture_output=True,
    )
    return out


def json_answer(result: Any) -> dict:
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


class HTTPAnswer:
    """A finished HTTP answer: status, headers (lower-case names), body and, when it is JSON, `json`."""

    def __init__(self, status: int, headers: dict, body: bytes):
        self.status, self.headers, self.body = status, headers, body
        try:
            self.json = json.loads(body)
        except ValueError:
            self.json = None


class ServerProcess:
    """`python board/serve.py --bundle B --emulate --port 0 ARGS` as a subprocess, its stderr collected.

    `wait_bound()` returns once the port is taken (before the model is loaded), `wait_ready()` once
    the server says it is listening with the model loaded; `stop()` sends SIGTERM and returns the
    exit status.
    """

    def __init__(self, bundle: Path, *args: str, env: dict | None = None):
        import os
        import subprocess
        import threading

        environ = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
        environ.update(env or {})
        self.proc = subprocess.Popen([sys.executable, str(ROOT / "board" / "serve.py"), "--bundle", str(bundle),
                                      "--emulate", "--port", "0", *args], stderr=subprocess.PIPE, text=True, env=environ)
        self.lines: list[str] = []
        self.url: str | None = None
        self._bound, self._ready = threading.Event(), threading.Event()
        threading.Thread(target=self._drain, daemon=True).start()

    def _drain(self) -> None:
        for line in self.proc.stderr:
            self.lines.append(line)
            if "bound to http://" in line:
                self.url = line.split("bound to ")[1].split()[0].rstrip(",;")
                self._bound.set()
            if "listening on http://" in line:
                self._ready.set()
        self._bound.set()
        self._ready.set()

    def output(self) -> str:
        return "".join(self.lines)

    def wait_bound(self, timeout: float = 60) -> "ServerProcess":
        if not self._bound.wait(timeout) or self.url is None:
            self.proc.kill()
            pytest.fail("the server did not bind its port:\n" + self.output())
        return self

    def wait_ready(self, timeout: float = 180) -> "ServerProcess":
        self.wait_bound()
        if not self._ready.wait(timeout) or self.proc.poll() is not None:
            self.proc.kill()
            pytest.fail("the server did not load the model:\n" + self.output())
        return self

    @property
    def address(self) -> tuple[str, int]:
        assert self.url is not None
        host, port = self.url.removeprefix("http://").rsplit(":", 1)
        return host.strip("[]"), int(port)

    def request(self, method: str, path: str, body: bytes | None = None, headers: dict | None = None, *,
                timeout: float = 60, read: bool = True) -> Any:
        """One request on a new connection: an HTTPAnswer, or with read=False the open http.client response."""
        import http.client

        connection = http.client.HTTPConnection(*self.address, timeout=timeout)
        connection.request(method, path, body=body, headers={"Content-Type": "application/json", **(headers or {})})
        response = connection.getresponse()
        if not read:
            return response
        answer = HTTPAnswer(response.status, {k.lower(): v for k, v in response.getheaders()}, response.read())
        connection.close()
        return answer

    def health(self) -> Any:
        return self.request("GET", "/health", timeout=10)

    def stop(self, timeout: float = 90) -> int:
        import signal

        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except Exception:
            self.proc.kill()
            raise

