"""The LLaMA-family runtime: model arguments, the model, loading (HF directories, GGUF, the
embedded SmolLM2), skip plans, the request plan that resolves one for a request
(request_plan) and the per-step schedule that executes it, online gates, and generation (prefill,
the decode driver shared by generate, speculative rounds and adaskip.hf, CUDA-graph decode steps)."""
from .config import ModelArgs
from .generation import GenerationResult, SamplingParams, generate
from .loading import load_model
from .model import Transformer
from .online import OnlineGates
from .skip_plan import MODES, SkipPlan
from .speculative import SpeculativeConfig

__all__ = ["ModelArgs", "Transformer", "load_model", "SkipPlan", "MODES", "OnlineGates", "SamplingParams",
           "GenerationResult", "generate", "SpeculativeConfig"]
