"""adaskip: adaptive sublayer skipping (AdaSkip, AAAI 2025) for long-context LLM inference."""
from . import ops
from .config import ModelArgs
from .generate import GenerationResult, SamplingParams, generate
from .loading import load_model
from .model import Transformer
from .plan import SkipPlan

__version__ = "0.1.0"
__all__ = ["ops", "ModelArgs", "Transformer", "SkipPlan", "SamplingParams", "GenerationResult",
           "generate", "load_model", "__version__"]
