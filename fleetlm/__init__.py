"""fleetlm: launcher-driven LLM pretraining on PaddlePaddle's fleet engine."""

__version__ = "0.1.0"
