"""adaskip: adaptive sublayer skipping (AdaSkip, AAAI 2025) for long-context LLM inference."""
from . import ops

__version__ = "0.1.0"
__all__ = ["ops", "__version__"]
