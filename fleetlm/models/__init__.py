"""Model families, their shared layers and the registry of named architectures."""

from fleetlm.models.config import ModelConfig, load_model_config

# model_type -> (module, class). Each module contains one architecture family, built from layers.py.
MODEL_CLASSES = {
    "llama": ("fleetlm.models.llama", "LlamaForCausalLM"),
    "baichuan": ("fleetlm.models.llama", "LlamaForCausalLM"),
    "qwen": ("fleetlm.models.llama", "LlamaForCausalLM"),
    "chatglm2": ("fleetlm.models.llama", "LlamaForCausalLM"),
    "gpt": ("fleetlm.models.gpt", "GPTForCausalLM"),
    "opt": ("fleetlm.models.gpt", "GPTForCausalLM"),
    "bloom": ("fleetlm.models.gpt", "GPTForCausalLM"),
    "chatglm": ("fleetlm.models.chatglm", "GLMForCausalLM"),
    "glm": ("fleetlm.models.chatglm", "GLMForCausalLM"),
}


def build_model(config: ModelConfig):
    """Instantiate the causal LM for ``config.model_type`` with freshly initialised weights."""
    import importlib

    if config.model_type not in MODEL_CLASSES:
        raise ValueError(f"model_type '{config.model_type}' has no model class; known: {', '.join(MODEL_CLASSES)}")
    module_name, class_name = MODEL_CLASSES[config.model_type]
    return getattr(importlib.import_module(module_name), class_name)(config)


__all__ = ["MODEL_CLASSES", "ModelConfig", "build_model", "load_model_config"]
