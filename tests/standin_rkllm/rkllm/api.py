"""The stand-in's RKLLM class: the 1.3.0 call sequence, recorded; see the package docstring.

Behaviour the tests select through the environment (read at call time):
  STANDIN_RKLLM_EXPORT=1       export_rkllm writes its labelled text file (otherwise it refuses: -1)
  STANDIN_RKLLM_SKIP_DATASET=1 build() returns 0 without reading the dataset (calibrates on nothing)
  STANDIN_RKLLM_BUILD_RC=N     build() returns N
  STANDIN_RKLLM_CALLS=FILE     every call and its keyword arguments appended as JSON lines
"""

import json
import os
import pickle
from pathlib import Path

STANDIN_MODEL_TEXT = b"RKLLM STAND-IN OUTPUT (tests/standin_rkllm): not a model, never load it on a board\n"


def _record(call, **kwargs):
    path = os.environ.get("STANDIN_RKLLM_CALLS")
    if path:
        with open(path, "a") as f:
            f.write(json.dumps({"call": call, **{k: v for k, v in kwargs.items() if isinstance(v, (str, int, float))}})
                    + "\n")


class RKLLM:
    def __init__(self):
        print("rkllm STAND-IN: RKLLM()", flush=True)
        self.model = None

    def load_huggingface(self, model, device="cpu", dtype="float32", **kwargs):
        _record("load_huggingface", model=model, device=device, dtype=dtype)
        if not (Path(model) / "config.json").is_file():
            print(f"rkllm STAND-IN: {model} has no config.json", flush=True)
            return -1
        self.model = model  # loaded by get_logits, so runs without held-out samples need no torch
        return 0

    def build(self, dataset=None, **kwargs):
        _record("build", dataset=dataset, **kwargs)
        rc = int(os.environ.get("STANDIN_RKLLM_BUILD_RC", "0"))
        if rc or os.environ.get("STANDIN_RKLLM_SKIP_DATASET") == "1":
            return rc
        entries = json.loads(Path(dataset).read_text())
        for entry in entries:
            if "sample" in entry:  # the 1.3.0 layout: pickles relative to the index's folder
                with open(Path(dataset).parent / entry["sample"], "rb") as f:
                    pickle.load(f)
        # the line Hugging Face datasets prints when it builds a dataset from a file
        print(f"Generating train split: {len(entries)} examples", flush=True)
        return 0

    def export_rkllm(self, path):
        _record("export_rkllm", path=path)
        if os.environ.get("STANDIN_RKLLM_EXPORT") != "1":
            print("rkllm STAND-IN: export refused (a test sets STANDIN_RKLLM_EXPORT=1 to get a labelled file)",
                  flush=True)
            return -1
        Path(path).write_bytes(STANDIN_MODEL_TEXT)
        return 0

    def get_logits(self, inputs):
        """The unquantized model's logits: what it returns proves the routing, never an accuracy."""
        import torch
        from transformers import AutoModelForCausalLM

        if isinstance(self.model, str):
            self.model = AutoModelForCausalLM.from_pretrained(self.model, dtype=torch.float32).eval()
        with torch.no_grad():
            return self.model(**inputs).logits
