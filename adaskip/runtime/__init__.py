"""The LLaMA-family runtime: model arguments, the model, loading (HF directories, GGUF, the
embedded SmolLM2), skip plans and the per-step schedule that executes them, online gates, and
generation (prefill, decode, CUDA-graph decode steps)."""
from .config import ModelArgs
from .generation import GenerationResult, SamplingParams, generate
from .loading import load_model
from .model import Transformer
from .online import OnlineGates
from .skip_plan import MODES, SkipPlan
from .speculative import SpeculativeConfig

__all__ = ["ModelArgs", "Transformer", "load_model", "SkipPlan", "MODES", "OnlineGates", "SamplingParams",
           "GenerationResult", "generate", "SpeculativeConfig"]
