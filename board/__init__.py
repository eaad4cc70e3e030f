"""SmolVLM on the RK3588: the on-device runtime.

The pipeline stages, one module each:
image_io (bytes -> RGB) -> tiles (SmolVLM splitting) -> vision (NPU encoder) ->
prompt + sequence (token ids, embeddings) -> decoder (librkllmrt) -> text.

Only numpy, OpenCV, Pillow and tokenizers are needed to import it; the NPU runtimes are loaded
lazily so every module imports on an x86 machine too.
"""

__version__ = "0.1.0"
