"""vLLM plugin of adaskip: serves what `adaskip export --format adaskip` writes.

Installed with `adaskip[vllm]` into vLLM's own environment, it is found through the
`vllm.general_plugins` entry point (pyproject.toml), which vLLM loads in every process it starts
(the API server, the engine core, each tensor-parallel worker). `register` only names the model
class; vLLM imports adaskip_vllm.model when a checkpoint asks for it. Nothing here imports
adaskip itself: its runtime needs its own torch and (on GPUs) its compiled extension, neither of
which belongs in vLLM's environment. This package needs torch and vLLM only.
"""

ARCHITECTURE = "AdaskipForCausalLM"  # config.json's "architectures" in an adaskip-format export


def register() -> None:
    """The `vllm.general_plugins` entry point: registers the model class with vLLM's ModelRegistry.
    vLLM may call it more than once in a process; a second call changes nothing."""
    from vllm import ModelRegistry

    if ARCHITECTURE not in ModelRegistry.get_supported_archs():
        # The "module:Class" form: the class (and vLLM's model code) is imported only when used.
        ModelRegistry.register_model(ARCHITECTURE, "adaskip_vllm.model:AdaskipForCausalLM")
