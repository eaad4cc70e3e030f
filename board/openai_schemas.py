"""OpenAI chat-completions shapes for board/serve.py: request validation in, response objects out.

Kept apart from the HTTP app so the rules can be read (and tested) in one place:

- A request becomes a `ChatRequest`: pipeline messages (content items `text` / `image`), the images'
  bytes in prompt order, SamplingParams, stream flags and stop strings. Anything wrong raises
  `APIError` with the HTTP status and OpenAI's error `type`/`code`/`param`, so the client gets
  `{"error": {"message", "type", "param", "code"}}`.
- Images: `image_url.url` as a base64 `data:` URL. Local files only when the server was given an
  image folder (`image_dir`): `file://` URLs or paths that resolve (symlinks followed) inside it.
  Remote URLs are never fetched (a board should not be made to download on request). Each image's
  header is read here, before the request waits for the NPU, so an oversized or broken image is a
  400 at once. `detail: "low"` on every image of a request means one tile per image (no splitting).
- Sampling: temperature 0 (or omitted, with the server's greedy default) is greedy decoding;
  temperature > 0 or top_p < 1 samples with top-k DEFAULT_TOP_K unless `top_k` is given (a common
  extension). `seed` is honoured in emulation; librkllmrt has no seed. `stop` takes up to 4 strings.
- Unsupported features that change the answer's meaning (n > 1, tools, logprobs, JSON mode,
  penalties other than 0) are refused with 400 rather than silently ignored.
- Text must be valid Unicode (a lone surrogate such as "\\ud800" is refused), and a request whose text
  could not fit the model's context even at the tokenizer's longest token per character run
  (`Limits.max_prompt_chars`) is refused here, before it waits for the NPU.
- Every error has a stable snake_case `code` (invalid_value, invalid_type, context_length_exceeded...).
"""

from __future__ import annotations

import os
import re
import secrets
import time
from dataclasses import dataclass, field
from pathlib import Path, PurePath
from typing import Any, Optional
from urllib.parse import unquote, urlparse

from .decoder import DEFAULT_TOP_K, SEED_RANGE, SamplingParams
from .errors import ImageError
from .image_io import probe, read_bytes
from .prompt import drop_leading_space

MAX_STOP_STRINGS = 4
ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}


# The code of an error that names none, by HTTP status.
STATUS_CODES = {400: "invalid_request", 401: "invalid_api_key", 404: "not_found", 405: "method_not_allowed",
                408: "request_timeout", 413: "request_too_large", 500: "internal_error", 503: "server_unavailable"}


class APIError(Exception):
    """A request the server refuses (4xx) or cannot serve (5xx), as OpenAI reports it.

    `retry_after` (seconds) goes out as a Retry-After header; `close` asks the server to close the
    connection after the answer (the request's body was not read to its end).
    """

    def __init__(self, status: int, message: str, *, type: Optional[str] = None, code: Optional[str] = None,
                 param: Optional[str] = None, retry_after: Optional[int] = None, close: bool = False):
        super().__init__(message)
        self.status, self.message, self.param = status, message, param
        self.type = type or ("server_error" if status >= 500 else "invalid_request_error")
        self.code = code or STATUS_CODES.get(status, "server_error" if status >= 500 else "invalid_request")
        self.retry_after = retry_after if retry_after is not None or status != 503 else 1
        self.close = close

    def body(self) -> dict[str, Any]:
        return error_body(self.message, type=self.type, code=self.code, param=self.param)


API_KEY_ENV = "SMOLVLM_API_KEY"  # the variable serve.py reads its key from, and batch --server sends


def error_body(message: str, *, type: str, code: Optional[str] = None, param: Optional[str] = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def invalid(message: str, *, param: Optional[str] = None, code: str = "invalid_value") -> APIError:
    return APIError(400, message, param=param, code=code)


def _string(value: Any, param: str) -> str:
    """A string from the request, refused unless it is valid Unicode (JSON lets "\\ud800" through)."""
    if not isinstance(value, str):
        raise invalid(f"'{param}' must be a string", param=param, code="invalid_type")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise invalid(f"'{param}' is not valid Unicode text (a lone surrogate at character {exc.start})", param=param,
                      code="invalid_unicode") from None
    return value


@dataclass(frozen=True)
class Limits:
    """What one request may ask for (the server's --max-* options)."""

    max_images: int = 4
    max_image_pixels: int = 50_000_000
    max_image_bytes: int = 24 << 20
    max_new_tokens: int = 4096  # the bundle's context is the real bound; this refuses absurd values early
    image_dir: Optional[Path] = None  # local image files allowed only under this folder
    # characters of message text beyond which the prompt cannot fit the context (None: no check here)
    max_prompt_chars: Optional[int] = None


@dataclass
class ChatRequest:
    """A validated chat-completions request, in the pipeline's terms."""

    model: str
    messages: list[dict[str, Any]]
    images: list[bytes]
    sampling: SamplingParams
    stream: bool = False
    include_usage: bool = False
    stop: list[str] = field(default_factory=list)
    max_tiles: Optional[int] = None


def _number(body: dict[str, Any], name: str, kind: type, low: float, high: float) -> Any:
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float) if kind is float else int):
        raise invalid(f"'{name}' must be {'a number' if kind is float else 'an integer'}", param=name,
                      code="invalid_type")
    if not low <= value <= high:
        raise invalid(f"'{name}' must be between {low} and {high}, got {value}", param=name)
    return kind(value)


def _refuse_unsupported(body: dict[str, Any]) -> None:
    def unsupported(message: str, param: str) -> APIError:
        return invalid(message, param=param, code="unsupported_parameter")

    if body.get("n") not in (None, 1):
        raise unsupported("only n=1 is supported (one answer per request)", "n")
    for name in ("tools", "functions", "logit_bias"):
        if body.get(name):
            raise unsupported(f"'{name}' is not supported by this server", name)
    if body.get("tool_choice") not in (None, "none"):
        raise unsupported("tool calls are not supported by this server", "tool_choice")
    if body.get("logprobs") or body.get("top_logprobs"):
        raise unsupported("logprobs are not supported by this server", "logprobs")
    response_format = body.get("response_format")
    if response_format not in (None, {"type": "text"}):
        raise unsupported("only the text response format is supported", "response_format")
    for name in ("frequency_penalty", "presence_penalty"):
        if body.get(name) not in (None, 0, 0.0):
            raise unsupported(f"'{name}' is not supported (use the 'repeat_penalty' extension)", name)


def sampling_params(body: dict[str, Any], default: SamplingParams, limits: Limits) -> SamplingParams:
    """OpenAI sampling fields over the server's defaults (greedy unless the request asks otherwise)."""
    max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
    param = "max_completion_tokens" if "max_completion_tokens" in body else "max_tokens"
    if max_tokens is not None:
        max_tokens = _number({param: max_tokens}, param, int, 1, limits.max_new_tokens)
    temperature = _number(body, "temperature", float, 0.0, 2.0)
    top_p = _number(body, "top_p", float, 0.0, 1.0)
    top_k = _number(body, "top_k", int, 0, 1 << 20)
    repeat_penalty = _number(body, "repeat_penalty", float, 0.01, 10.0)
    seed = _number(body, "seed", int, *SEED_RANGE)
    if temperature == 0.0:
        top_k = 1
    elif top_k is None and ((temperature or 0) > 0 or (top_p is not None and top_p < 1)):
        top_k = DEFAULT_TOP_K
    params = SamplingParams(
        max_new_tokens=max_tokens if max_tokens is not None else default.max_new_tokens,
        top_k=top_k if top_k is not None else default.top_k,
        top_p=top_p if top_p is not None else default.top_p,
        temperature=temperature if temperature else default.temperature,
        repeat_penalty=repeat_penalty if repeat_penalty is not None else default.repeat_penalty,
        seed=seed if seed is not None else default.seed,
    )
    problem = params.problem()  # the decoders' own rules (board/decoder.py), before the request waits
    if problem is not None:
        field_name, message = problem
        raise invalid(message, param=param if field_name == "max_new_tokens" else field_name)
    return params


def stop_strings(body: dict[str, Any]) -> list[str]:
    stop = body.get("stop")
    if stop is None:
        return []
    items = [stop] if isinstance(stop, str) else stop
    if not isinstance(items, list) or not all(isinstance(s, str) and s for s in items):
        raise invalid("'stop' must be a non-empty string or a list of them", param="stop", code="invalid_type")
    if len(items) > MAX_STOP_STRINGS:
        raise invalid(f"'stop' takes at most {MAX_STOP_STRINGS} strings", param="stop")
    return [_string(s, "stop") for s in items]


def image_bytes(url: Any, limits: Limits, param: str) -> bytes:
    """An image_url's bytes (data: URL, or a file under the allowed folder), header-checked."""
    if not isinstance(url, str) or not url:
        raise invalid("'image_url.url' must be a string", param=param, code="invalid_type")
    _string(url, param)
    try:
        if url.startswith("data:"):
            data = read_bytes(url, max_bytes=limits.max_image_bytes)
        else:
            data = read_bytes(_local_file(url, limits, param), max_bytes=limits.max_image_bytes)
        probe(data, max_pixels=limits.max_image_pixels)
    except ImageError as err:
        raise invalid(f"{param}: {err.message}", param=param, code="invalid_image") from None
    return data


def _local_file(url: str, limits: Limits, param: str) -> Path:
    """The file an image URL names, refused unless it lies inside the allowed image folder."""
    parsed = urlparse(url)
    if parsed.scheme not in ("", "file"):
        raise invalid(f"{param}: remote image URLs are not fetched by this server; send the image as a base64 "
                      "data: URL", param=param, code="image_url_not_allowed")
    if limits.image_dir is None:
        raise invalid(f"{param}: local image files are not enabled on this server (start it with --image-dir); "
                      "send the image as a base64 data: URL", param=param, code="image_url_not_allowed")
    if parsed.scheme == "file" and parsed.netloc not in ("", "localhost"):
        raise invalid(f"{param}: file URLs must name a local path", param=param, code="image_url_not_allowed")
    root = os.path.realpath(limits.image_dir)
    try:
        path = os.path.realpath(os.path.join(root, unquote(parsed.path, errors="strict") if parsed.scheme else url))
    except (ValueError, OSError) as exc:  # a NUL byte, an undecodable %-escape
        raise invalid(f"{param}: not a usable file path ({exc})", param=param, code="invalid_image") from None
    if os.path.commonpath([root, path]) != root:
        raise invalid(f"{param}: the image file is outside the server's image folder", param=param,
                      code="image_url_not_allowed")
    return Path(path)


def _content(message: dict[str, Any], index: int, role: str, limits: Limits, images: list[bytes],
             details: list[Any]) -> list[dict[str, Any]]:
    """A message's content as pipeline items; image parts add their bytes to `images`."""
    content, where = message.get("content"), f"messages[{index}].content"
    if isinstance(content, str):
        return [{"type": "text", "text": _string(content, where)}]
    if not isinstance(content, list) or not content:
        raise invalid(f"'{where}' must be a string or a non-empty list of content parts", param=where,
                      code="invalid_type")
    items: list[dict[str, Any]] = []
    for j, part in enumerate(content):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text" and isinstance(part.get("text"), str):
            items.append({"type": "text", "text": _string(part["text"], f"{where}[{j}].text")})
        elif kind == "image_url":
            if role != "user":
                raise invalid(f"images are accepted in user messages only ({where}[{j}])", param=f"{where}[{j}]",
                              code="unsupported_value")
            if len(images) >= limits.max_images:
                raise invalid(f"too many images: this server takes at most {limits.max_images} per request",
                              param=f"{where}[{j}]", code="too_many_images")
            spec = part.get("image_url")
            url, detail = (spec.get("url"), spec.get("detail")) if isinstance(spec, dict) else (spec, None)
            images.append(image_bytes(url, limits, f"{where}[{j}].image_url"))
            details.append(detail)
            items.append({"type": "image"})
        else:
            raise invalid(f"'{where}[{j}]' must be a text part or an image_url part", param=f"{where}[{j}]",
                          code="invalid_type")
    return items


def parse_chat_request(body: Any, *, default_sampling: SamplingParams, limits: Limits) -> ChatRequest:
    """Validate a decoded JSON body; raise APIError (400) naming the first thing wrong."""
    if not isinstance(body, dict):
        raise invalid("the request body must be a JSON object", code="invalid_type")
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise invalid("'model' is required", param="model", code="missing_required_parameter")
    _string(model, "model")
    raw = body.get("messages")
    if not isinstance(raw, list) or not raw:
        raise invalid("'messages' is required: a non-empty list", param="messages", code="missing_required_parameter")
    _refuse_unsupported(body)
    messages: list[dict[str, Any]] = []
    images: list[bytes] = []
    details: list[Any] = []
    for i, message in enumerate(raw):
        name = message.get("role") if isinstance(message, dict) else None
        role = ROLES.get(name) if isinstance(name, str) else None
        if role is None:
            raise invalid(f"'messages[{i}].role' must be one of {', '.join(ROLES)}", param=f"messages[{i}].role")
        if message.get("tool_calls"):
            raise invalid("tool calls are not supported by this server", param=f"messages[{i}].tool_calls",
                          code="unsupported_parameter")
        messages.append({"role": role, "content": _content(message, i, role, limits, images, details)})
    chars = sum(len(item["text"]) for m in messages for item in m["content"] if item["type"] == "text")
    if limits.max_prompt_chars is not None and chars > limits.max_prompt_chars:
        raise invalid(f"the messages hold {chars} characters of text: more than the model's context can hold "
                      f"(at most {limits.max_prompt_chars} for any text)", param="messages",
                      code="context_length_exceeded")
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise invalid("'stream' must be true or false", param="stream", code="invalid_type")
    options = body.get("stream_options") or {}
    if not isinstance(options, dict):
        raise invalid("'stream_options' must be an object", param="stream_options", code="invalid_type")
    return ChatRequest(
        model=model, messages=messages, images=images,
        sampling=sampling_params(body, default_sampling, limits),
        stream=stream, include_usage=bool(stream and options.get("include_usage")), stop=stop_strings(body),
        max_tiles=1 if details and all(d == "low" for d in details) else None,
    )


class AnswerText:
    """What the client sees of the streamed text: the leading space SmolVLM puts after 'Assistant:'
    dropped (board.prompt.drop_leading_space, as Chat records answers), and the text cut before the
    first stop string.

    Text that could be the start of a stop string is held back until it cannot be.
    """

    def __init__(self, stop: list[str]):
        self.stop = stop
        self.stopped = False
        self._started = False
        self._held = ""

    def feed(self, piece: str) -> str:
        if self.stopped or not piece:
            return ""
        if not self._started:
            self._started = True
            piece = drop_leading_space(piece)
        text = self._held + piece
        cut = min((i for i in (text.find(s) for s in self.stop) if i >= 0), default=-1)
        if cut >= 0:
            self.stopped, self._held = True, ""
            return text[:cut]
        keep = max((n for s in self.stop for n in range(len(s) - 1, 0, -1) if text.endswith(s[:n])), default=0)
        self._held = text[len(text) - keep:] if keep else ""
        return text[: len(text) - keep]

    def flush(self) -> str:
        """The held-back text when the answer ended without a stop string."""
        held, self._held = self._held, ""
        return "" if self.stopped else held


# -- responses --------------------------------------------------------------------------------


def completion_id() -> str:
    return "chatcmpl-" + secrets.token_hex(12)


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def chat_completion(cid: str, created: int, model: str, text: str, finish_reason: str,
                    usage_counts: dict[str, int], timings: Optional[dict[str, Any]] = None) -> dict[str, Any]:
    """A non-streamed answer; `timings` is this server's extension (the pipeline's per-stage times)."""
    out = {"id": cid, "object": "chat.completion", "created": created, "model": model,
           "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                        "finish_reason": finish_reason, "logprobs": None}],
           "usage": usage_counts}
    if timings is not None:
        out["timings"] = timings
    return out


def chat_chunk(cid: str, created: int, model: str, delta: Optional[dict[str, Any]] = None,
               finish_reason: Optional[str] = None, usage_counts: Optional[dict[str, int]] = None) -> dict[str, Any]:
    """One server-sent event of a streamed answer; the usage chunk (stream_options) has no choices."""
    choices = [] if usage_counts is not None else [
        {"index": 0, "delta": delta or {}, "finish_reason": finish_reason, "logprobs": None}]
    out: dict[str, Any] = {"id": cid, "object": "chat.completion.chunk", "created": created, "model": model,
                           "choices": choices}
    if usage_counts is not None:
        out["usage"] = usage_counts
    return out


def model_slug(name: str) -> str:
    """The model id clients send: the bundle's model name as one word (no spaces, no description in
    parentheses, a local checkpoint folder by its last component); the name itself stays the
    display name in /v1/models."""
    head = name.split(" (")[0].strip()
    if head.startswith(("/", "./", "../", "~")):
        head = PurePath(head).name
    return re.sub(r"[^A-Za-z0-9._:/-]+", "-", head).strip("-/") or "smolvlm"


def model_card(model: str, created: Optional[int] = None, name: Optional[str] = None) -> dict[str, Any]:
    """A /v1/models entry: `model` is the id clients send, `name` (an extension) the display name."""
    card = {"id": model, "object": "model", "created": created or int(time.time()), "owned_by": "smolvlm-rk3588"}
    if name is not None:
        card["name"] = name
    return card


def model_list(model: str, created: Optional[int] = None, name: Optional[str] = None) -> dict[str, Any]:
    return {"object": "list", "data": [model_card(model, created, name)]}
