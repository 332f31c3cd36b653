"""Model families, their shared layers and the registry of named architectures."""

from fleetlm.models.config import ModelConfig, load_model_config


def build_model(config: ModelConfig):
    """Instantiate the causal LM for ``config.model_type`` with freshly initialised weights."""
    if config.model_type == "llama":
        from fleetlm.models.llama import LlamaForCausalLM

        return LlamaForCausalLM(config)
    raise ValueError(f"model_type '{config.model_type}' has no model class")


__all__ = ["ModelConfig", "build_model", "load_model_config"]
