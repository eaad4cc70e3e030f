"""The errors the runtime raises, as a small hierarchy the CLI and the server map to messages.

Every error carries a message written for the person running the command; `hint` says what to do.
The CLI prints `str(err)` (no traceback); the server maps InputError to HTTP 4xx and the rest to 5xx,
with the class's `code` (a stable snake_case string, what OpenAI's error `code` field carries).
"""

from __future__ import annotations


class SmolVLMError(Exception):
    """Base class: a failure explained in plain words."""

    code = "internal_error"

    def __init__(self, message: str, *, hint: str | None = None):
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return f"{self.message}\n  hint: {self.hint}" if self.hint else self.message


class InputError(SmolVLMError):
    """The request itself is wrong (bad image, bad prompt); nothing is broken."""

    code = "invalid_request"


class ImageError(InputError):
    """An image cannot be read: unreadable bytes, unsupported format, zero size or too large."""

    code = "invalid_image"


class PromptError(InputError):
    """The conversation cannot be turned into a prompt: image/placeholder mismatch, too long, bad shape."""

    code = "invalid_prompt"


class ContextLengthExceeded(PromptError):
    """The prompt (or the conversation with it) holds more tokens than the model's context."""

    code = "context_length_exceeded"


class BundleError(SmolVLMError):
    """A bundle folder is missing files, was tampered with, or was made by an incompatible version."""

    code = "bundle_error"


class RuntimeUnavailable(SmolVLMError):
    """A system component is missing or too old: NPU driver, librkllmrt, librknnrt, rknnlite, a host toolkit."""

    code = "runtime_unavailable"


class DecoderError(SmolVLMError):
    """The language-model runtime failed while loading or generating."""

    code = "decoder_error"


class VisionError(SmolVLMError):
    """The vision encoder failed while loading or running."""

    code = "vision_error"


class PrefillMismatch(DecoderError):
    """The runtime prefilled another number of tokens than the rows fed: it added or dropped some."""

    code = "prefill_mismatch"
