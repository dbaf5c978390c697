"""`make test-vllm`, step 2 (vLLM's own venv, `.venv-vllm`): serve the exported folders with a
real vLLM and check its greedy tokens against adaskip.generate's (vllm_prepare.py), and that
vLLM built no attention, so no KV cache, for the plan's skipped attention layers. Writes
OUT_DIR/vllm.json, every figure bench/results/README.md quotes from it included (KV-cache
capacity in tokens, engine start, whether the tokens are equal) and the provenance of both steps
(command, commit, dirty state, versions, date), and exits non-zero on any mismatch. Nothing in it
is typed by hand: bench/results/ keeps a copy (make test-vllm VLLM_RESULT=<path>).

    python tests/integration/vllm_serve.py OUT_DIR
"""
import datetime as dt
import json
import os
import platform
import shlex
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def provenance() -> dict:
    """This step's command, commit and versions (vLLM's venv cannot import adaskip: another torch)."""
    def git(*a):
        try:
            return subprocess.run(["git", *a], cwd=ROOT, capture_output=True, text=True, check=True,
                                  timeout=10).stdout
        except (OSError, subprocess.SubprocessError):
            return None

    import torch
    import vllm

    head, status = git("rev-parse", "HEAD"), git("status", "--porcelain")
    commit = os.environ.get("ADASKIP_GIT_COMMIT") or (head.strip() if head else "unknown")
    lines = None if status is None or os.environ.get("ADASKIP_GIT_COMMIT") else status.splitlines()
    if lines and not commit.endswith("+dirty"):
        commit += "+dirty"
    try:
        script = str(Path(sys.argv[0]).resolve().relative_to(ROOT))
    except ValueError:
        script = sys.argv[0]
    return {"command": " ".join(["python", script, *(shlex.quote(a) for a in sys.argv[1:])]),
            "git_commit": commit, "git_dirty": None if lines is None else bool(lines), "git_status": lines,
            "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
            "device": f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)",
            "vllm": vllm.__version__, "torch": torch.__version__, "python": platform.python_version(),
            "vllm_cpu_kvcache_space_gib": float(os.environ["VLLM_CPU_KVCACHE_SPACE"])}


def attention_layers(model):
    """Per decoder layer: whether vLLM built an attention module for it (runs in the worker)."""
    layers = model.model.layers
    return [getattr(layer, "self_attn", None) is not None for layer in layers]


def serve(folder: Path, prompts, max_tokens: int) -> dict:
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    t0 = time.perf_counter()
    llm = LLM(model=str(folder), trust_remote_code=True, dtype="float32", max_model_len=1024, enforce_eager=True,
              seed=0)
    start_s = time.perf_counter() - t0
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
    outputs = llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts], params, use_tqdm=False)
    cache = llm.llm_engine.vllm_config.cache_config
    built = llm.apply_model(attention_layers)[0]
    result = {"tokens": [list(o.outputs[0].token_ids) for o in outputs], "attention_built": built,
              "kv_blocks": cache.num_gpu_blocks, "block_size": cache.block_size, "engine_start_s": start_s}
    del llm
    return result


def main(out: Path) -> int:
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    # The engine in this process: apply_model then reads the model without pickling a function.
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    started = provenance()
    expected = json.loads((out / "expected.json").read_text())
    plan = serve(out / "plan", expected["prompts"], expected["max_tokens"])
    full = serve(out / "full", expected["prompts"], expected["max_tokens"])
    skipped = set(expected["skipped_attention_layers"])
    kv_tokens = {"plan": plan["kv_blocks"] * plan["block_size"], "full": full["kv_blocks"] * full["block_size"]}
    report = {**started, "prepare": expected.get("provenance"), "calibration": expected.get("calibration"),
              "adaskip_plan": expected["plan"], "prompts": expected["prompts"], "max_tokens": expected["max_tokens"],
              "plan": plan, "full": full, "expected": expected["expected"], "expected_full": expected["expected_full"],
              "tokens_equal": plan["tokens"] == expected["expected"],
              "full_tokens_equal": full["tokens"] == expected["expected_full"],
              "no_attention_where_skipped": [i for i, b in enumerate(plan["attention_built"]) if not b] == sorted(skipped),
              "attention_layers_built": {"plan": sum(plan["attention_built"]), "full": sum(full["attention_built"])},
              "kv_cache_tokens": kv_tokens, "kv_cache_tokens_ratio": round(kv_tokens["plan"] / kv_tokens["full"], 4),
              "engine_start_s": {"plan": round(plan["engine_start_s"], 2), "full": round(full["engine_start_s"], 2)},
              "adaskip_kv_cache_bytes": expected["kv_cache_bytes"]}
    (out / "vllm.json").write_text(json.dumps(report, indent=1) + "\n")
    print(json.dumps({k: v for k, v in report.items() if k not in ("plan", "full", "expected", "expected_full",
                                                                   "prompts", "adaskip_plan", "prepare")}, indent=1))
    ok = report["tokens_equal"] and report["full_tokens_equal"] and report["no_attention_where_skipped"]
    if not ok:
        print("vLLM's tokens:", plan["tokens"], "\nadaskip's:", expected["expected"], file=sys.stderr)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main(Path(sys.argv[1])))
