"""adaskip: adaptive sublayer skipping (AdaSkip, AAAI 2025) for long-context LLM inference.

    model, tokenizer = adaskip.load_model("smollm2")
    profile = adaskip.calibrate(model, texts, tokenizer=tokenizer)     # -> ImportanceProfile
    plan = adaskip.plan(profile, num_sublayers=8)                      # -> SkipPlan
    out = adaskip.generate(model, [prompt_ids], plan=plan)

Layers, each importing only from those before it: ops (kernels and their references) <- runtime
(model, loading, plans, schedules, generation) <- skipping (calibration, profiles, search,
strategies, costs) <- evaluation, hf (plans on stock transformers models), exporting (checkpoints for vLLM) <-
benchmarks <- cli.
"""
from . import ops
from ._version import __version__
from .runtime import (GenerationResult, ModelArgs, SamplingParams, SkipPlan, SpeculativeConfig, Transformer, generate,
                      load_model)
from .skipping import STRATEGIES, ImportanceProfile, calibrate, plan, plan_drafter, search
from . import hf  # noqa: E402  (after skipping, which it builds on)
from .exporting import export  # noqa: E402

__all__ = ["ops", "hf", "export", "load_model", "calibrate", "ImportanceProfile", "search", "plan", "plan_drafter", "SkipPlan", "STRATEGIES",
           "generate", "SpeculativeConfig", "SamplingParams", "GenerationResult", "ModelArgs", "Transformer", "__version__"]
