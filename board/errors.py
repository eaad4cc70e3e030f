"""The errors the runtime raises, as a small hierarchy the CLI and the server map to messages.

Every error carries a message written for the person running the command; `hint` says what to do.
The CLI prints `str(err)` (no traceback); the server maps InputError to HTTP 4xx and the rest to 5xx.
"""

from __future__ import annotations


class SmolVLMError(Exception):
    """Base class: a failure explained in plain words."""

    def __init__(self, message: str, *, hint: str | None = None):
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return f"{self.message}\n  hint: {self.hint}" if self.hint else self.message


class InputError(SmolVLMError):
    """The request itself is wrong (bad image, bad prompt); nothing is broken."""


class ImageError(InputError):
    """An image cannot be read: unreadable bytes, unsupported format, zero size or too large."""


class PromptError(InputError):
    """The conversation cannot be turned into a prompt: image/placeholder mismatch, too long, bad shape."""


class BundleError(SmolVLMError):
    """A bundle folder is missing files, was tampered with, or was made by an incompatible version."""


class RuntimeUnavailable(SmolVLMError):
    """A system component is missing or too old: NPU driver, librkllmrt, librknnrt, rknnlite, a host toolkit."""


class DecoderError(SmolVLMError):
    """The language-model runtime failed while loading or generating."""


class VisionError(SmolVLMError):
    """The vision encoder failed while loading or running."""


class PrefillMismatch(DecoderError):
    """The runtime prefilled another number of tokens than the rows fed: it added or dropped some."""
