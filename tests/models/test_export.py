"""Export of fleetlm checkpoints to Hugging Face layout, and the dry-run memory estimate."""

import json

import numpy as np
import paddle
import pytest

from fleetlm.arguments import ModelArguments, parse_arguments
from fleetlm.dry_run import describe_run, estimate_memory, main as dry_run_main
from fleetlm.export import export_checkpoint, main as export_main
from fleetlm.models import ModelConfig, build_model, load_model_config
from fleetlm.models.registry import MODEL_REGISTRY
from fleetlm.models.weights import load_pretrained

TOKENS = np.random.default_rng(3).integers(0, 512, size=(2, 15))


def write_fleet_checkpoint(directory, registry_name):
    """A checkpoint-STEP-like directory: config.json with the architecture, model_state.pdparams."""
    config = ModelConfig(**MODEL_REGISTRY[registry_name])
    paddle.seed(9)
    model = build_model(config)
    with paddle.no_grad():
        for parameter in model.parameters():
            parameter.set_value(parameter + 0.05 * paddle.randn(parameter.shape))
    model.eval()
    directory.mkdir()
    paddle.save(model.state_dict(), str(directory / "model_state.pdparams"))
    (directory / "config.json").write_text(json.dumps({"arguments": {}, "model": config.architecture_dict()}))
    return model


@pytest.mark.parametrize(
    "registry_name, auto_class",
    [("fleetlm/tiny-llama", "LlamaForCausalLM"), ("fleetlm/tiny-qwen", "Qwen2ForCausalLM"),
     ("fleetlm/tiny-gpt", "GPT2LMHeadModel"), ("fleetlm/tiny-opt", "OPTForCausalLM"),
     ("fleetlm/tiny-bloom", "BloomForCausalLM")],
)
def test_export_loads_in_transformers(registry_name, auto_class, tmp_path):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    model = write_fleet_checkpoint(tmp_path / "checkpoint-3", registry_name)
    assert export_main([str(tmp_path / "checkpoint-3"), str(tmp_path / "hf")]) == 0

    reference = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "hf")).eval()
    assert type(reference).__name__ == auto_class
    with torch.no_grad():
        expected = reference(torch.tensor(TOKENS)).logits.numpy()
    difference = np.abs(model(paddle.to_tensor(TOKENS)).numpy() - expected).max()
    print(f"{registry_name} -> {auto_class}: max |logits difference| {difference:.2e}")
    assert difference < 1e-4


@pytest.mark.parametrize("registry_name", ["fleetlm/tiny-baichuan2", "fleetlm/tiny-chatglm2", "fleetlm/tiny-chatglm"])
def test_export_round_trip_without_transformers(registry_name, tmp_path):
    model = write_fleet_checkpoint(tmp_path / "checkpoint-3", registry_name)
    export_checkpoint(str(tmp_path / "checkpoint-3"), str(tmp_path / "hf"))
    config = load_model_config(ModelArguments(model_name_or_path=str(tmp_path / "hf")))
    assert config.architecture_dict() == model.config.architecture_dict()
    reloaded = build_model(config)
    load_pretrained(reloaded, config, str(tmp_path / "hf"))
    reloaded.eval()
    np.testing.assert_array_equal(reloaded(paddle.to_tensor(TOKENS)).numpy(), model(paddle.to_tensor(TOKENS)).numpy())


def test_fleet_checkpoint_loads_by_name(tmp_path):
    model = write_fleet_checkpoint(tmp_path / "checkpoint-3", "fleetlm/tiny-glm")
    config = load_model_config(ModelArguments(model_name_or_path=str(tmp_path / "checkpoint-3")))
    reloaded = build_model(config)
    load_pretrained(reloaded, config, str(tmp_path / "checkpoint-3"))
    reloaded.eval()
    np.testing.assert_array_equal(reloaded(paddle.to_tensor(TOKENS)).numpy(), model(paddle.to_tensor(TOKENS)).numpy())


def test_dry_run_divides_by_degrees():
    config = ModelConfig(**MODEL_REGISTRY["meta-llama/Llama-2-7b"])
    single = estimate_memory(config, tp=1, pp=1, sharding_stage=0, sharding_degree=1, low_precision=False)
    assert single.total_parameters == 6_738_415_616  # Llama-2-7b's published count
    assert single.card_parameters == single.total_parameters
    assert single.parameter_bytes == 4 * single.total_parameters
    assert single.optimizer_bytes == 8 * single.total_parameters

    tp2 = estimate_memory(config, tp=2, pp=1, sharding_stage=0, sharding_degree=1, low_precision=False)
    norms = (2 * config.num_hidden_layers + 1) * config.hidden_size  # replicated on every tp rank
    assert tp2.card_parameters == (single.total_parameters - norms) // 2 + norms

    stage2 = estimate_memory(config, tp=1, pp=1, sharding_stage=2, sharding_degree=4, low_precision=True)
    assert stage2.parameter_bytes == 2 * single.total_parameters
    assert stage2.gradient_bytes == 2 * single.total_parameters / 4
    assert stage2.optimizer_bytes == 12 * single.total_parameters / 4

    pp4 = estimate_memory(config, tp=1, pp=4, sharding_stage=0, sharding_degree=1, low_precision=False)
    block = (single.total_parameters - 2 * config.vocab_size * config.hidden_size - config.hidden_size) // 32
    assert pp4.card_parameters == 8 * block + config.vocab_size * config.hidden_size + config.hidden_size


def test_dry_run_report(capsys):
    args = parse_arguments(["--model_name_or_path", "qwen/qwen-7b", "--tensor_parallel_degree", "2",
                            "--sharding", "stage2", "--sharding_parallel_degree", "4", "--bf16", "true"])
    report = describe_run(args, world_size=8)
    assert "7.721B parameters" in report
    assert "8 cards = tp 2 x pp 1 x dp 4; sharding stage2 over 4 ranks" in report
    assert dry_run_main(["--model_name_or_path", "gpt3-175b", "--tensor_parallel_degree", "8"]) == 2
    assert "vocab_size=50257 is not divisible by tensor_parallel_degree=8" in capsys.readouterr().err


def test_pdparams_with_other_names_rejected(tmp_path):
    from fleetlm.arguments import ConfigError

    model = write_fleet_checkpoint(tmp_path / "checkpoint-3", "fleetlm/tiny-qwen")
    renamed = {name.replace("llama.", "qwen."): value for name, value in model.state_dict().items()}
    paddle.save(renamed, str(tmp_path / "checkpoint-3" / "model_state.pdparams"))
    with pytest.raises(ConfigError, match="must use fleetlm's tensor names .* no 'llama.embed_tokens.weight'"):
        load_pretrained(build_model(model.config), model.config, str(tmp_path / "checkpoint-3"))


def test_norm_head_module_normalises_alone():
    # Pipeline stages call model.lm_head on its own, so the module itself must normalise.
    config = ModelConfig(**MODEL_REGISTRY["fleetlm/tiny-baichuan2"])
    model = build_model(config)
    hidden = paddle.randn([1, 3, config.hidden_size])
    weight = model.lm_head.weight.numpy()
    expected = hidden.numpy() @ (weight / np.linalg.norm(weight, axis=0, keepdims=True))
    np.testing.assert_allclose(model.lm_head(hidden).numpy(), expected, rtol=1e-5, atol=1e-6)
