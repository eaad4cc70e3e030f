"""board/serve.py's /metrics: Prometheus text format from prometheus_client, llama-server's habit.

Names start with `smolvlm_`. Counters of requests by endpoint and HTTP status, the queue in front
of the NPU, tokens, worker restarts, and latency histograms per pipeline stage (the worker's
Timings of each answer) and for the time a request waits in the queue. One registry per server
(not the library's global one), so tests can run servers side by side.
"""

from __future__ import annotations

from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

# seconds: from a cached tiny image (ms) to a long answer on the board (tens of seconds)
_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 25.0, 60.0, 120.0, 300.0)
# Timings fields (milliseconds) -> the stage label they are reported under
STAGES = {"image_decode_ms": "image_decode", "tiles_ms": "tiles", "vision_ms": "vision", "sequence_ms": "sequence",
          "prefill_ms": "prefill", "ttft_ms": "first_token", "decode_ms": "decode", "total_ms": "total"}


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("smolvlm_http_requests", "HTTP requests answered, by endpoint and status code",
                                ["endpoint", "status"], registry=r)
        self.queue_length = Gauge("smolvlm_queue_length", "requests waiting for the NPU worker", registry=r)
        self.running = Gauge("smolvlm_requests_running", "requests the NPU worker is answering (0 or 1)", registry=r)
        self.worker_up = Gauge("smolvlm_worker_up", "1 when the NPU worker has loaded the bundle", registry=r)
        self.worker_restarts = Counter("smolvlm_worker_restarts", "NPU worker processes that died and were replaced",
                                       registry=r)
        self.prompt_tokens = Counter("smolvlm_prompt_tokens", "prompt tokens fed to the decoder", registry=r)
        self.completion_tokens = Counter("smolvlm_completion_tokens", "tokens generated", registry=r)
        self.images = Counter("smolvlm_images", "images in answered requests, by whether the vision cache had them",
                              ["cached"], registry=r)
        self.stage_seconds = Histogram("smolvlm_stage_seconds", "time per pipeline stage of one answer",
                                       ["stage"], buckets=_BUCKETS, registry=r)
        self.queue_wait = Histogram("smolvlm_queue_wait_seconds", "time a request waited for the NPU worker",
                                    buckets=_BUCKETS, registry=r)

    def record_answer(self, finished: Any) -> None:
        """One answer the worker finished (a serve_worker.Finished)."""
        self.prompt_tokens.inc(finished.prompt_tokens)
        self.completion_tokens.inc(finished.completion_tokens)
        timings = finished.timings
        images, cached = timings.get("images", 0), timings.get("images_cached", 0)
        self.images.labels(cached="yes").inc(cached)
        self.images.labels(cached="no").inc(images - cached)
        for key, stage in STAGES.items():
            if timings.get(key):
                self.stage_seconds.labels(stage=stage).observe(timings[key] / 1e3)

    def render(self) -> tuple[bytes, str]:
        """The exposition text and its content type."""
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
