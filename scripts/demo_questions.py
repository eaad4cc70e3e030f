#!/usr/bin/env python3
"""Ask host.demo_model's fixed question set in both chat templates and print the answers as JSON.

This is the measurement behind the demo model's default template (README "Demo"): for each template
a checkpoint is built offline (small random vision tower: text answers do not depend on it), and
transformers' own greedy generate() answers every question of host.demo_model.QUESTIONS. An answer
counts as right when it contains one of the question's words, and as stopped when the model ended
it by itself within --max-new-tokens.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from host import demo_model as D  # noqa: E402


def ask_all(checkpoint: Path, max_new_tokens: int, system: str | None) -> list[dict]:
    import torch
    from transformers import AutoModelForImageTextToText, AutoProcessor

    processor = AutoProcessor.from_pretrained(checkpoint)
    model = AutoModelForImageTextToText.from_pretrained(checkpoint, dtype=torch.float32).eval()
    stop_ids = set(model.generation_config.eos_token_id)
    rows = []
    for question, words in D.QUESTIONS:
        messages = [{"role": "system", "content": [{"type": "text", "text": system}]}] if system else []
        messages.append({"role": "user", "content": [{"type": "text", "text": question}]})
        inputs = processor(text=processor.apply_chat_template(messages, add_generation_prompt=True), return_tensors="pt")
        with torch.no_grad():
            out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
        new = out[0, inputs["input_ids"].shape[1]:].tolist()
        answer = processor.tokenizer.decode(new, skip_special_tokens=True).strip()
        rows.append({"question": question, "answer": answer, "tokens": len(new), "stopped": new[-1] in stop_ids,
                     "right": bool(set(words) & set(re.findall(r"[a-z0-9]+", answer.lower())))})
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--system", help="a system message before every question (default: none, as board/run.py)")
    args = parser.parse_args()
    from host.convert import quiet_libraries

    quiet_libraries()
    g = D.read_gguf()
    result = {"questions": len(D.QUESTIONS), "max_new_tokens": args.max_new_tokens, "system": args.system,
              "templates": {}}
    with tempfile.TemporaryDirectory() as tmp:
        for template in D.TEMPLATES:
            checkpoint = D.build_demo_checkpoint(Path(tmp) / template, template, vision="small", gguf=g)
            start = time.perf_counter()
            rows = ask_all(checkpoint, args.max_new_tokens, args.system)
            result["templates"][template] = {
                "right": sum(r["right"] for r in rows), "stopped": sum(r["stopped"] for r in rows),
                "right_and_stopped": sum(r["right"] and r["stopped"] for r in rows),
                "seconds": round(time.perf_counter() - start, 1), "answers": rows,
            }
    print(json.dumps(result, indent=2, ensure_ascii=False))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
