"""board/serve.py in emulation, as a client sees it: a real server process on a free localhost port,
the official `openai` client, and raw HTTP for what a well-behaved client never sends.

Greedy answers must equal what `Pipeline.generate` gives for the same conversation (the text minus
the one leading space SmolVLM puts after 'Assistant:', as Chat records answers); concurrent requests
are served one at a time in arrival order; a client that goes away loses its place or its generation;
every malformed request is a 4xx in OpenAI's error shape and the server keeps serving. What an
adversarial client does (tests/test_serve_abuse.py) and the worker process's life (crash, restart,
graceful stop: tests/test_serve_process.py) have their own modules; this one's server is shared.
"""

from __future__ import annotations

import base64
import http.client
import json
import shutil
import socket
import threading
import time

import numpy as np
import pytest

pytest.importorskip("torch")
pytest.importorskip("onnxruntime")
openai = pytest.importorskip("openai")

from board.bundle import Bundle  # noqa: E402
from board.decoder import SamplingParams  # noqa: E402
from board.openai_schemas import APIError, AnswerText, Limits, parse_chat_request, sampling_params  # noqa: E402
from board.pipeline import Pipeline  # noqa: E402
from board.serve import API_KEY_ENV, SEQ_HEADER, model_slug  # noqa: E402
from support import ServerProcess, write_image  # noqa: E402

KEY = "test-key-123"
Q = "What is in this image?"


# -- fixtures -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pipeline(bundle):
    with Pipeline(bundle, emulate=True) as p:
        yield p


@pytest.fixture(scope="module")
def image_dir(tmp_path_factory, images):
    root = tmp_path_factory.mktemp("served")
    allowed = root / "allowed"
    allowed.mkdir()
    shutil.copy(images["small"], allowed / "small.png")
    shutil.copy(images["small"], root / "outside.png")
    (allowed / "link.png").symlink_to(root / "outside.png")
    write_image(allowed / "big.png", 1000, 1100, 4)  # 1.1 MP: over the server's --max-image-mp 1
    return allowed


@pytest.fixture(scope="module")
def server(bundle, image_dir):
    """`python board/serve.py --emulate --port 0` with an API key and tight limits; stopped with SIGTERM.

    What it answered while the worker was still loading is kept in `.while_loading`."""
    proc = ServerProcess(bundle, "--max-images", "2", "--max-body-mb", "3", "--max-image-mp", "1", "--max-queue", "8",
                         "--image-dir", str(image_dir), "--quiet", env={API_KEY_ENV: KEY})
    try:
        proc.wait_bound()
        chat = {"model": model_slug(Bundle.open(bundle, verify=False).model_id),
                "messages": [{"role": "user", "content": "Hi"}]}
        proc.while_loading = [proc.request("GET", "/health"),
                              proc.request("POST", "/v1/chat/completions", json.dumps(chat).encode(),
                                           {"Authorization": f"Bearer {KEY}"})]
        proc.wait_ready()
        yield proc
    finally:
        status = proc.stop()
    assert status == 0, proc.output()
    assert "Traceback" not in proc.output(), proc.output()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def model(pipeline):
    return model_slug(pipeline.bundle.model_id)


def data_url(path) -> str:
    return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode()


def request(server, method: str, path: str, body: bytes | None = None, headers: dict | None = None,
            timeout: float = 60) -> http.client.HTTPResponse:
    """A raw request (the standard library's client): what a well-behaved client library never sends."""
    return server.request(method, path, body, headers, timeout=timeout, read=False)


def health(server) -> dict:
    response = request(server, "GET", "/health", timeout=10)
    assert response.status == 200
    return json.loads(response.read())


def wait_for(condition, timeout: float = 30.0):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        value = condition()
        if value:
            return value
        time.sleep(0.02)
    raise AssertionError("timed out waiting for the server")


def expected(pipeline, messages, images=(), max_new=12):
    """What the pipeline answers to the same conversation, greedy: (text as served, prompt tokens, answer)."""
    reply = pipeline.generate(messages, list(images), sampling=SamplingParams(max_new_tokens=max_new))
    answer = reply.collect()
    text = answer.text[1:] if answer.text.startswith(" ") else answer.text
    return text, len(reply.prompt), answer


def image_message(url: str, question: str = Q) -> dict:
    return {"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                        {"type": "text", "text": question}]}


PIPE_IMAGE_MESSAGE = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": Q}]}]


# -- the openai client -----------------------------------------------------------------------------


def test_models_lists_the_bundle_model(client, model, pipeline):
    listed = client.models.list().data
    assert [m.id for m in listed] == [model] and " " not in model
    assert listed[0].model_extra["name"] == pipeline.bundle.model_id  # the display name stays
    assert client.models.retrieve(model).id == model
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("gpt-4o")


def test_while_loading_health_and_chat_are_503_with_retry_after(server):
    health_answer, chat_answer = server.while_loading
    assert health_answer.status == 503 and health_answer.json["status"] == "loading"
    assert chat_answer.status == 503 and chat_answer.json["error"]["code"] == "model_loading"
    assert int(health_answer.headers["retry-after"]) >= 1 and int(chat_answer.headers["retry-after"]) >= 1
    assert json.loads(request(server, "GET", "/health").read())["status"] == "ok"


def test_chat_with_image_equals_pipeline(client, pipeline, model, images):
    text, prompt_tokens, answer = expected(pipeline, PIPE_IMAGE_MESSAGE, [images["small"]])
    completion = client.chat.completions.create(model=model, messages=[image_message(data_url(images["small"]))],
                                                max_tokens=12, temperature=0)
    choice = completion.choices[0]
    assert choice.message.role == "assistant" and choice.message.content == text
    assert choice.finish_reason == answer.finish_reason
    assert completion.usage.prompt_tokens == prompt_tokens and completion.usage.completion_tokens == len(answer.token_ids)
    assert completion.usage.total_tokens == prompt_tokens + len(answer.token_ids)
    assert completion.object == "chat.completion" and completion.id.startswith("chatcmpl-")


def test_streaming_chat_with_image_equals_pipeline(client, pipeline, model, images):
    text, prompt_tokens, answer = expected(pipeline, PIPE_IMAGE_MESSAGE, [images["wide"]], max_new=16)
    chunks = list(client.chat.completions.create(
        model=model, messages=[image_message(data_url(images["wide"]))], max_completion_tokens=16, stream=True,
        stream_options={"include_usage": True}))
    choice_chunks = [c for c in chunks if c.choices]
    assert choice_chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in choice_chunks) == text
    assert [c.choices[0].finish_reason for c in choice_chunks].count(None) == len(choice_chunks) - 1
    assert choice_chunks[-1].choices[0].finish_reason == answer.finish_reason
    assert chunks[-1].choices == [] and chunks[-1].usage.prompt_tokens == prompt_tokens
    assert chunks[-1].usage.completion_tokens == len(answer.token_ids)
    assert all(c.object == "chat.completion.chunk" and c.id == chunks[0].id for c in chunks)


def test_text_conversation_equals_pipeline(client, pipeline, model):
    """System (and 'developer') message, an earlier turn with an answer, no image; streamed and not."""
    openai_messages = [{"role": "developer", "content": "Answer briefly."},
                       {"role": "user", "content": [{"type": "text", "text": "Hello"}]},
                       {"role": "assistant", "content": "Hi! How can I help?"},
                       {"role": "user", "content": "Tell me a joke."}]
    pipe_messages = [{"role": "system", "content": "Answer briefly."}, *openai_messages[1:]]
    text, prompt_tokens, _ = expected(pipeline, pipe_messages, max_new=10)
    completion = client.chat.completions.create(model=model, messages=openai_messages, max_tokens=10)
    assert completion.choices[0].message.content == text and completion.usage.prompt_tokens == prompt_tokens
    stream = client.chat.completions.create(model=model, messages=openai_messages, max_tokens=10, stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in stream) == text


def test_stop_strings_cut_the_answer(client, pipeline, model):
    messages = [{"role": "user", "content": "Write a poem."}]
    text, _, _ = expected(pipeline, messages, max_new=24)
    assert len(text) >= 6, f"the tiny model's answer is too short to cut: {text!r}"
    stop = text[len(text) // 2: len(text) // 2 + 2]
    cut = text[: text.find(stop)]
    for stream in (False, True):
        response = client.chat.completions.create(model=model, messages=messages, max_tokens=24, stop=[stop, "\x00never"],
                                                  stream=stream)
        if stream:
            chunks = list(response)
            got, finish = "".join(c.choices[0].delta.content or "" for c in chunks), chunks[-1].choices[0].finish_reason
        else:
            got, finish = response.choices[0].message.content, response.choices[0].finish_reason
        assert (got, finish) == (cut, "stop"), stream


def test_local_files_only_inside_the_image_dir(client, pipeline, model, image_dir, images):
    text, _, _ = expected(pipeline, PIPE_IMAGE_MESSAGE, [images["small"]])
    inside = client.chat.completions.create(
        model=model, messages=[image_message((image_dir / "small.png").as_uri())], max_tokens=12)
    assert inside.choices[0].message.content == text
    for url in [str(image_dir / ".." / "outside.png"), (image_dir / "link.png").as_uri(), "../outside.png",
                "http://127.0.0.1:9/cat.png", "https://example.com/cat.png"]:
        with pytest.raises(openai.BadRequestError) as info:
            client.chat.completions.create(model=model, messages=[image_message(url)], max_tokens=4)
        assert info.value.code == "image_url_not_allowed", url


def test_sse_wire_format(server, model):
    body = {"model": model, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4, "stream": True}
    response = request(server, "POST", "/v1/chat/completions", json.dumps(body).encode(),
                    {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"})
    assert response.status == 200 and response.getheader("Content-Type") == "text/event-stream"
    assert response.getheader("Transfer-Encoding") == "chunked"
    lines = [line for line in response.read().decode().split("\n") if line]
    assert all(line.startswith("data: ") for line in lines) and lines[-1] == "data: [DONE]"
    assert lines.count("data: [DONE]") == 1
    events = [json.loads(line[6:]) for line in lines[:-1]]
    assert events[-1]["choices"][0]["finish_reason"] in ("stop", "length")
    assert all(e["object"] == "chat.completion.chunk" for e in events)


# -- one NPU queue ------------------------------------------------------------------------------------


def test_concurrent_requests_are_served_in_arrival_order(server, client, pipeline, model, images):
    """A long image request runs while three more arrive; each is answered, in arrival order."""
    jobs = [([image_message(data_url(images["wide"]))], PIPE_IMAGE_MESSAGE, [images["wide"]], 48),
            *[([{"role": "user", "content": q}], [{"role": "user", "content": q}], [], 8)
              for q in ("Count to five.", "Name a colour.", "Say hello.")]]
    results: dict[int, tuple[int, str]] = {}
    errors: list[BaseException] = []

    def ask(i: int) -> None:
        try:
            raw = client.chat.completions.with_raw_response.create(model=model, messages=jobs[i][0], max_tokens=jobs[i][3])
            results[i] = (int(raw.headers[SEQ_HEADER]), raw.parse().choices[0].message.content)
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    before = health(server)
    seen_queued = 0
    threads = []
    for i in range(len(jobs)):
        threads.append(threading.Thread(target=ask, args=(i,)))
        threads[-1].start()

        def accepted(i=i) -> bool:
            nonlocal seen_queued
            h = health(server)
            seen_queued = max(seen_queued, h["queued"])
            return h["served"] + h["running"] + h["queued"] - before["served"] >= i + 1

        wait_for(accepted)
    for t in threads:
        t.join(120)
    assert not errors, errors
    assert seen_queued >= 1, "no request ever waited: the test did not exercise the queue"
    seqs = [results[i][0] for i in range(len(jobs))]
    assert seqs == sorted(seqs) and len(set(seqs)) == len(seqs), seqs
    for i, (_, pipe_messages, paths, max_new) in enumerate(jobs):
        assert results[i][1] == expected(pipeline, pipe_messages, paths, max_new)[0], i
    after = health(server)
    assert after["served"] - before["served"] == len(jobs) and not after["running"] and after["queued"] == 0


def _raw_request(server, body: dict) -> socket.socket:
    data = json.dumps(body).encode()
    host, port = server.url.removeprefix("http://").split(":")
    sock = socket.create_connection((host, int(port)))
    sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 b"Authorization: Bearer " + KEY.encode() + b"\r\nContent-Length: %d\r\n\r\n" % len(data) + data)
    return sock


def test_client_disconnect_aborts_its_generation_or_its_place(server, client, model):
    """A streaming client that leaves stops its generation; a queued client that leaves is never run."""
    before = health(server)
    long = {"model": model, "messages": [{"role": "user", "content": "Write a long story."}], "max_tokens": 3000,
            "stream": True}
    running = _raw_request(server, long)
    reader = running.makefile("rb")
    assert b" 200 " in reader.readline()
    while b"data: " not in reader.readline():  # the stream has begun: the generation is running
        pass
    queued = _raw_request(server, {**long, "stream": False})
    wait_for(lambda: health(server)["queued"] == 1)
    queued.close()
    time.sleep(0.5)  # its HTTP thread notices and cancels it while it waits
    reader.close()
    running.close()
    wait_for(lambda: health(server)["aborted"] - before["aborted"] == 2, timeout=20)
    after = health(server)
    assert after["served"] == before["served"] and not after["running"] and after["queued"] == 0
    reply = client.chat.completions.create(model=model, messages=[{"role": "user", "content": "Hi"}], max_tokens=3)
    assert reply.choices[0].finish_reason in ("stop", "length")


def test_a_full_queue_is_503_with_retry_after(server, client, model):
    """A long answer runs; with --max-queue 8, of ten more requests sent at once at least one is refused
    with 503 server_overloaded and a Retry-After, and the rest are answered."""
    long = {"model": model, "messages": [{"role": "user", "content": "Write a long story."}], "max_tokens": 3000,
            "stream": True}
    running = _raw_request(server, long)
    reader = running.makefile("rb")
    assert b" 200 " in reader.readline()
    while b"data: " not in reader.readline():
        pass
    short = json.dumps({"model": model, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2}).encode()
    results: list = [None] * 10

    def ask(i: int) -> None:
        results[i] = server.request("POST", "/v1/chat/completions", short, {"Authorization": f"Bearer {KEY}"},
                                    timeout=120)

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(10)]
    for t in threads:
        t.start()
    wait_for(lambda: any(r is not None for r in results))
    reader.close()
    running.close()  # the long answer is aborted: the queue drains
    for t in threads:
        t.join(120)
    statuses = sorted(r.status for r in results)
    assert set(statuses) <= {200, 503} and 503 in statuses and 200 in statuses, statuses
    refused = next(r for r in results if r.status == 503)
    assert refused.json["error"]["code"] == "server_overloaded" and int(refused.headers["retry-after"]) >= 1
    assert health(server)["queued"] == 0


# -- malformed requests ------------------------------------------------------------------------------


def _post(server, body=None, *, key=KEY, raw: bytes | None = None, path="/v1/chat/completions"):
    headers = {"Content-Type": "application/json"}
    if key is not None:
        headers["Authorization"] = f"Bearer {key}"
    response = request(server, "POST", path, raw if raw is not None else json.dumps(body).encode(), headers)
    return response.status, json.loads(response.read())


def _bad_cases(model, image_url):
    text = [{"role": "user", "content": "Hi"}]
    not_png = "data:image/png;base64," + base64.b64encode(b"hello, not an image").decode()
    three = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": image_url}}] * 3}]
    return {
        "bad JSON": (dict(raw=b'{"model": '), 400, "invalid_json"),
        "not an object": (dict(raw=b"[1, 2]"), 400, "invalid_type"),
        "missing messages": (dict(body={"model": model}), 400, "missing_required_parameter"),
        "empty messages": (dict(body={"model": model, "messages": []}), 400, "missing_required_parameter"),
        "missing model": (dict(body={"messages": text}), 400, "missing_required_parameter"),
        "unknown model": (dict(body={"model": "gpt-4o", "messages": text}), 404, "model_not_found"),
        "bad base64": (dict(body={"model": model, "messages": [image_message("data:image/png;base64,@@@")]}), 400,
                       "invalid_image"),
        "not an image": (dict(body={"model": model, "messages": [image_message(not_png)]}), 400, "invalid_image"),
        "too many pixels": (dict(body={"model": model, "messages": [image_message("big.png")]}), 400, "invalid_image"),
        "too many images": (dict(body={"model": model, "messages": three}), 400, "too_many_images"),
        "oversize body": (dict(body={"model": model, "messages": [{"role": "user", "content": "x" * (12 << 20)}]}), 413,
                          "request_too_large"),
        "wrong API key": (dict(body={"model": model, "messages": text}, key="wrong"), 401, "invalid_api_key"),
        "no API key": (dict(body={"model": model, "messages": text}, key=None), 401, "invalid_api_key"),
        "unknown role": (dict(body={"model": model, "messages": [{"role": "tool", "content": "x"}]}), 400, None),
        "role not a string": (dict(body={"model": model, "messages": [{"role": ["user"], "content": "x"}]}), 400, None),
        "message not an object": (dict(body={"model": model, "messages": ["Hi"]}), 400, None),
        "content part not an object": (dict(body={"model": model, "messages": [{"role": "user", "content": [7]}]}),
                                       400, None),
        "image in a system message": (dict(body={"model": model, "messages": [
            {"role": "system", "content": [{"type": "image_url", "image_url": {"url": image_url}}]}]}), 400, None),
        "n=2": (dict(body={"model": model, "messages": text, "n": 2}), 400, None),
        "tools": (dict(body={"model": model, "messages": text, "tools": [{"type": "function"}]}), 400, None),
        "max_tokens 0": (dict(body={"model": model, "messages": text, "max_tokens": 0}), 400, None),
        "max_tokens over the context": (dict(body={"model": model, "messages": text, "max_tokens": 10 ** 6}), 400, None),
        "temperature text": (dict(body={"model": model, "messages": text, "temperature": "hot"}), 400, None),
        "stop not strings": (dict(body={"model": model, "messages": text, "stop": [1]}), 400, None),
        "prompt over the context": (dict(body={"model": model, "messages": [
            {"role": "user", "content": "word " * 6000}]}), 400, "context_length_exceeded"),
        "unknown endpoint": (dict(body={}, path="/v1/completions"), 404, "not_found"),
    }


def test_malformed_requests_are_4xx_and_the_server_keeps_serving(server, client, model, images):
    for name, (kwargs, status, code) in _bad_cases(model, data_url(images["small"])).items():
        got, body = _post(server, **kwargs)
        assert got == status, (name, body)
        error = body["error"]
        assert isinstance(error["message"], str) and error["message"] and error["type"], name
        assert isinstance(error["code"], str) and error["code"].islower() and " " not in error["code"], (name, error)
        if code is not None:
            assert error["code"] == code, (name, error)
        assert health(server)["status"] == "ok", name
    assert health(server)["failed"] >= 1  # the over-long prompt reached the worker and failed there, alone
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=server.url + "/v1", api_key="wrong", max_retries=0).models.list()
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "Hi"}])
    assert client.chat.completions.create(model=model, messages=[{"role": "user", "content": "Hi"}],
                                          max_tokens=3).choices[0].message.role == "assistant"


# -- request rules, in-process --------------------------------------------------------------------


def test_sampling_mapping():
    default, limits = SamplingParams(max_new_tokens=99), Limits(max_new_tokens=500)
    assert sampling_params({}, default, limits) == default  # the server's greedy default
    greedy = sampling_params({"temperature": 0, "top_k": 7, "max_tokens": 5}, default, limits)
    assert greedy.greedy and greedy.max_new_tokens == 5
    sampled = sampling_params({"temperature": 0.7, "top_p": 0.9, "seed": 3}, default, limits)
    assert (sampled.top_k, sampled.temperature, sampled.top_p, sampled.seed) == (40, 0.7, 0.9, 3)
    assert sampling_params({"max_completion_tokens": 7, "max_tokens": 9}, default, limits).max_new_tokens == 7
    for bad in ({"max_tokens": 501}, {"temperature": 3}, {"top_p": 0}, {"seed": "x"}, {"max_tokens": True}):
        with pytest.raises(APIError):
            sampling_params(bad, default, limits)


def test_detail_low_on_every_image_means_one_tile(images):
    url = data_url(images["small"])
    part = {"type": "image_url", "image_url": {"url": url, "detail": "low"}}
    body = {"model": "m", "messages": [{"role": "user", "content": [part, part]}]}
    assert parse_chat_request(body, default_sampling=SamplingParams(), limits=Limits()).max_tiles == 1
    body["messages"][0]["content"][1] = {"type": "image_url", "image_url": {"url": url}}
    request = parse_chat_request(body, default_sampling=SamplingParams(), limits=Limits())
    assert request.max_tiles is None and len(request.images) == 2
    assert request.messages == [{"role": "user", "content": [{"type": "image"}, {"type": "image"}]}]


@pytest.mark.parametrize("pieces, stop, shown", [
    ([" Hello", " wor", "ld!"], ["world"], "Hello "),
    ([" Hel", "lo"], ["lo!"], "Hello"),  # a held-back prefix of a stop string that never completes
    (["ab", "c", "d"], ["bcd", "x"], "a"),
    (["  two spaces"], [], " two spaces"),  # only one leading space is SmolVLM's
])
def test_answer_text_drops_the_leading_space_and_cuts_at_stop(pieces, stop, shown):
    text = AnswerText(stop)
    out = "".join(text.feed(p) for p in pieces) + text.flush()
    assert out == shown
    assert text.stopped == (shown != "".join(pieces).removeprefix(" "))


def test_a_tile_budget_below_one_is_a_usage_error(tmp_path, capsys):
    from board.serve import main

    with pytest.raises(SystemExit) as exited:
        main(["--bundle", str(tmp_path), "--max-tiles", "0"])
    assert exited.value.code == 2
    assert "--max-tiles: the tile budget must be at least 1" in capsys.readouterr().err


def test_pipeline_outputs_are_deterministic(pipeline):
    """The parity tests above rest on greedy answers being repeatable in one process."""
    a = expected(pipeline, [{"role": "user", "content": "Hi"}], max_new=6)[2].token_ids
    b = expected(pipeline, [{"role": "user", "content": "Hi"}], max_new=6)[2].token_ids
    assert a == b and np.asarray(a).size > 0
