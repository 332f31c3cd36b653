"""Registered architectures: they validate, build with shapes only, and match published parameter counts."""

import math

import pytest

from fleetlm.dry_run import parameter_shapes
from fleetlm.models import ModelConfig
from fleetlm.models.registry import MODEL_REGISTRY, bundled_tokenizer_files
from fleetlm.tokenizer import load_tokenizer

# Parameter counts from the model cards and papers, in billions.
PUBLISHED_BILLIONS = {
    "facebook/llama-7b": 6.7,
    "facebook/llama-13b": 13.0,
    "facebook/llama-65b": 65.2,
    "meta-llama/Llama-2-70b": 69.0,
    "bigscience/bloom": 176.2,
    "bigscience/bloom-7b1": 7.07,
    "qwen/qwen-7b": 7.7,
    "THUDM/chatglm2-6b": 6.2,
    "facebook/opt-66b": 66.0,
    "gpt3-175b": 175.0,
    "gpt3-13b": 13.0,
    "gpt3-125m": 0.125,
}


@pytest.mark.parametrize("name", sorted(MODEL_REGISTRY))
def test_entry_validates(name):
    ModelConfig(**MODEL_REGISTRY[name]).validate()


@pytest.mark.parametrize("name", sorted(PUBLISHED_BILLIONS))
def test_parameter_count_matches_published(name):
    count = sum(math.prod(shape) for _, shape in parameter_shapes(ModelConfig(**MODEL_REGISTRY[name])))
    assert count / 1e9 == pytest.approx(PUBLISHED_BILLIONS[name], rel=0.015)


def test_registered_tokenizers_fit_vocabulary():
    files = bundled_tokenizer_files()
    assert files["qwen/qwen-7b"].endswith("qwen.tiktoken")
    assert files["gpt3-1.3b"].endswith("gpt2.tiktoken")
    assert files["THUDM/chatglm2-6b"].endswith("tokenizer.json")
    assert files["baichuan-inc/Baichuan2-13B-Base"].endswith("tokenizer.model")
    assert "bigscience/bloom-7b1" not in files
    sizes = {}
    for name, path in files.items():
        sizes.setdefault(path, load_tokenizer(path).vocab_size)
        assert sizes[path] <= MODEL_REGISTRY[name]["vocab_size"], name
    assert load_tokenizer("qwen/qwen-7b").vocab_size == 151851
