"""Logits and loss of fleetlm against Hugging Face transformers, on tiny random models saved to disk.

Each case builds a random fp32 model in transformers (CPU) and saves it as safetensors (one file
or sharded with an index) or as a PyTorch .bin. fleetlm loads that directory through its config
translation and weight import, and the test compares logits and loss. The HF weights are perturbed after
init so that norms and biases are not the trivial ones and zeros.
"""

import os

import numpy as np
import paddle
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from fleetlm.arguments import ModelArguments  # noqa: E402
from fleetlm.models import build_model, load_model_config  # noqa: E402
from fleetlm.models.weights import load_pretrained  # noqa: E402

VOCAB = 128


def _tiny_configs():
    t = transformers
    return {
        "llama-gqa": (t.LlamaForCausalLM, t.LlamaConfig(
            vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=64, rms_norm_eps=1e-5, rope_theta=500.0)),
        "llama-tied-bias": (t.LlamaForCausalLM, t.LlamaConfig(
            vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
            max_position_embeddings=64, tie_word_embeddings=True, attention_bias=True, mlp_bias=True)),
        "qwen2": (t.Qwen2ForCausalLM, t.Qwen2Config(
            vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=4, max_position_embeddings=64, rms_norm_eps=1e-6, tie_word_embeddings=False)),
        "gpt2": (t.GPT2LMHeadModel, t.GPT2Config(
            vocab_size=VOCAB, n_embd=64, n_layer=2, n_head=4, n_positions=64, bos_token_id=0, eos_token_id=0)),
        "opt-pre-norm": (t.OPTForCausalLM, t.OPTConfig(
            vocab_size=VOCAB, hidden_size=64, ffn_dim=128, num_hidden_layers=2, num_attention_heads=4,
            max_position_embeddings=64, word_embed_proj_dim=64, do_layer_norm_before=True)),
        "opt-350m-like": (t.OPTForCausalLM, t.OPTConfig(
            vocab_size=VOCAB, hidden_size=64, ffn_dim=128, num_hidden_layers=2, num_attention_heads=4,
            max_position_embeddings=64, word_embed_proj_dim=32, do_layer_norm_before=False)),
        "bloom": (t.BloomForCausalLM, t.BloomConfig(
            vocab_size=VOCAB, hidden_size=64, n_layer=2, n_head=4)),
        # 6 heads: ALiBi slopes for a head count that is not a power of two.
        "bloom-6-heads": (t.BloomForCausalLM, t.BloomConfig(
            vocab_size=VOCAB, hidden_size=48, n_layer=2, n_head=6)),
    }


def save_random_model(name, directory, file_format="safetensors"):
    """Build, perturb and save the named tiny model; return it in eval mode."""
    model_class, config = _tiny_configs()[name]
    torch.manual_seed(0)
    model = model_class(config).eval()
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(0.05 * torch.randn_like(parameter))
    if file_format == "bin":
        model.config.save_pretrained(directory)
        torch.save(model.state_dict(), os.path.join(directory, "pytorch_model.bin"))
    elif file_format == "sharded":
        model.save_pretrained(directory, max_shard_size="20KB")
    else:
        model.save_pretrained(directory)
    return model


def load_fleet_model(directory):
    config = load_model_config(ModelArguments(model_name_or_path=str(directory)))
    paddle.seed(123)  # the load must overwrite every initialised value
    model = build_model(config)
    load_pretrained(model, config, str(directory))
    model.eval()
    return model


def compare(reference, fleet_model, tokens):
    with torch.no_grad():
        out = reference(torch.tensor(tokens), labels=torch.tensor(tokens))
    expected_logits, expected_loss = out.logits.numpy(), float(out.loss)
    logits = fleet_model(paddle.to_tensor(tokens)).numpy()
    loss = float(fleet_model(paddle.to_tensor(tokens[:, :-1]), paddle.to_tensor(tokens[:, 1:])))
    return np.abs(logits - expected_logits).max(), abs(loss - expected_loss)


@pytest.mark.parametrize(
    "name, file_format",
    [
        ("llama-gqa", "safetensors"),
        ("llama-gqa", "sharded"),
        ("llama-tied-bias", "bin"),
        ("qwen2", "bin"),
        ("gpt2", "safetensors"),
        ("opt-pre-norm", "safetensors"),
        ("opt-350m-like", "safetensors"),
        ("bloom", "safetensors"),
        ("bloom-6-heads", "sharded"),
    ],
)
def test_logits_match_transformers(name, file_format, tmp_path):
    reference = save_random_model(name, tmp_path, file_format)
    if file_format == "sharded":
        assert (tmp_path / "model.safetensors.index.json").exists()
    fleet_model = load_fleet_model(tmp_path)
    tokens = np.random.default_rng(0).integers(0, VOCAB, size=(2, 17))
    logit_difference, loss_difference = compare(reference, fleet_model, tokens)
    print(f"{name} ({file_format}): max |logits difference| {logit_difference:.2e}, loss {loss_difference:.2e}")
    assert logit_difference < 1e-4
    assert loss_difference < 1e-5


def test_shape_mismatch_names_tensor(tmp_path):
    save_random_model("llama-gqa", tmp_path)
    config = load_model_config(ModelArguments(model_name_or_path=str(tmp_path), intermediate_size=80))
    model = build_model(config)
    from fleetlm.arguments import ConfigError

    with pytest.raises(ConfigError, match=r"mlp.gate_proj.weight.* has shape \[64, 96\], the model expects \[64, 80\]"):
        load_pretrained(model, config, str(tmp_path))


def test_missing_tensor_named(tmp_path):
    from safetensors.numpy import save_file

    from fleetlm.arguments import ConfigError
    from fleetlm.models.weights import read_safetensors

    save_random_model("gpt2", tmp_path)
    tensors = read_safetensors(str(tmp_path / "model.safetensors"))
    del tensors["transformer.h.1.mlp.c_fc.bias"]
    save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()}, str(tmp_path / "model.safetensors"))
    config = load_model_config(ModelArguments(model_name_or_path=str(tmp_path)))
    with pytest.raises(ConfigError, match=r"tensor 'transformer.h.1.mlp.c_fc.bias' \(for gpt.layers.1.mlp.up_proj.bias\)"):
        load_pretrained(build_model(config), config, str(tmp_path))
