"""Argument parsing: PaddleNLP names, JSON then CLI precedence, and every rejection."""

import json

import pytest

from fleetlm.arguments import ConfigError, format_help, parse_arguments

# The keys of a PaddleNLP llm/ pretraining argument file for LLaMA-2 7B (tp2, sharding stage2).
PADDLENLP_STYLE_FILE = {
    "model_name_or_path": "meta-llama/Llama-2-7b",
    "tokenizer_name_or_path": "meta-llama/Llama-2-7b",
    "input_dir": "./data",
    "output_dir": "./checkpoints/llama2_pretrain_ckpts",
    "per_device_train_batch_size": 2,
    "gradient_accumulation_steps": 8,
    "per_device_eval_batch_size": 2,
    "tensor_parallel_degree": 2,
    "pipeline_parallel_degree": 1,
    "sharding": "stage2",
    "virtual_pp_degree": 1,
    "sequence_parallel": 0,
    "use_flash_attention": True,
    "use_fused_rms_norm": False,
    "use_fused_rope": True,
    "max_seq_length": 4096,
    "learning_rate": 3e-05,
    "min_learning_rate": 3e-06,
    "warmup_steps": 30,
    "logging_steps": 1,
    "max_steps": 10000,
    "save_steps": 5000,
    "eval_steps": 1000,
    "weight_decay": 0.01,
    "bf16": True,
    "fp16_opt_level": "O2",
    "warmup_ratio": 0.01,
    "max_grad_norm": 1.0,
    "dataloader_num_workers": 1,
    "continue_training": 0,
    "do_train": True,
    "do_eval": True,
    "do_predict": True,
    "disable_tqdm": True,
    "recompute": False,
    "distributed_dataloader": 1,
    "recompute_granularity": "full",
    "save_total_limit": 2,
}


def write_json(tmp_path, values, name="args.json"):
    path = tmp_path / name
    path.write_text(json.dumps(values))
    return str(path)


def test_paddlenlp_file_parses(tmp_path):
    args = parse_arguments([write_json(tmp_path, PADDLENLP_STYLE_FILE)])
    assert args.training.tensor_parallel_degree == 2
    assert args.training.sharding == "stage2"
    assert args.training.sequence_parallel is False
    assert args.model.continue_training is False
    assert args.data.max_seq_length == 4096
    assert args.training.bf16 is True
    assert set(args.ignored) == {"dataloader_num_workers", "distributed_dataloader"}


def test_cli_overrides_file(tmp_path):
    path = write_json(tmp_path, {"max_steps": 100, "learning_rate": 1e-3})
    args = parse_arguments([path, "--max_steps", "7", "--learning_rate=2e-4", "--do_eval"])
    assert args.training.max_steps == 7
    assert args.training.learning_rate == 2e-4
    assert args.training.do_eval is True


def test_defaults_without_file():
    args = parse_arguments([])
    assert args.training.per_device_train_batch_size == 1
    assert args.data.split == "949,50,1"


def test_resume_accepts_bool_and_path(tmp_path):
    assert parse_arguments([write_json(tmp_path, {"resume_from_checkpoint": True})]).training.resume_from_checkpoint == "true"
    assert parse_arguments([write_json(tmp_path, {"resume_from_checkpoint": False})]).training.resume_from_checkpoint is None
    assert parse_arguments(["--resume_from_checkpoint", "out/checkpoint-5"]).training.resume_from_checkpoint == "out/checkpoint-5"


@pytest.mark.parametrize(
    "values, expected",
    [
        ({"max_step": 5}, "Unknown argument 'max_step'"),
        ({"max_step": 5}, "Did you mean 'max_steps'?"),
        ({"tensor_paralel_degree": 2}, "Did you mean 'tensor_parallel_degree'?"),
        ({"max_steps": "ten"}, "max_steps='ten': expected an integer"),
        ({"max_steps": 2.5}, "max_steps=2.5: expected an integer"),
        ({"max_steps": True}, "expected an integer, got a boolean"),
        ({"learning_rate": "fast"}, "learning_rate='fast': expected a number"),
        ({"bf16": "yes"}, "bf16='yes': expected true or false"),
        ({"bf16": 2}, "bf16=2: expected true or false"),
        ({"split": 949}, "split=949: expected a string"),
        ({"lr_scheduler_type": "step"}, "lr_scheduler_type='step' is not one of"),
        ({"sharding": "stage4"}, "sharding='stage4' is not one of"),
        ({"recompute_granularity": "half"}, "recompute_granularity='half' is not one of"),
        ({"per_device_train_batch_size": 0}, "per_device_train_batch_size=0: must be at least 1"),
        ({"max_seq_length": -8}, "max_seq_length=-8: must be at least 1"),
        ({"learning_rate": -1.0}, "learning_rate=-1.0: must not be negative"),
        ({"warmup_ratio": 1.5}, "warmup_ratio=1.5: must be in [0, 1)"),
        ({"min_learning_rate": 1.0, "learning_rate": 0.1}, "min_learning_rate=1.0 is above learning_rate=0.1"),
        ({"adam_beta2": 1.0}, "adam_beta2=1.0: must be in [0, 1)"),
        ({"bf16": True, "fp16": True}, "bf16 and fp16 are both true"),
        ({"sharding_parallel_degree": 0}, "sharding_parallel_degree=0"),
        ({"no_recompute_layers": [1, "a"]}, "expected a list of integers"),
    ],
)
def test_bad_values_rejected(tmp_path, values, expected):
    with pytest.raises(ConfigError) as info:
        parse_arguments([write_json(tmp_path, values)])
    assert expected in str(info.value)


def test_bad_cli_value_rejected():
    with pytest.raises(ConfigError, match="max_steps='x': expected an integer"):
        parse_arguments(["--max_steps", "x"])
    with pytest.raises(ConfigError, match="Unexpected command-line value '4'"):
        parse_arguments(["--max_steps", "3", "4", "stray"])


def test_bad_json_file_rejected(tmp_path):
    path = tmp_path / "broken.json"
    path.write_text('{"max_steps": 5,,}')
    with pytest.raises(ConfigError, match=r"broken.json is not valid JSON: .* line 1"):
        parse_arguments([str(path)])
    with pytest.raises(ConfigError, match="Argument file not found"):
        parse_arguments([str(tmp_path / "missing.json")])
    path.write_text("[1, 2]")
    with pytest.raises(ConfigError, match="must hold one JSON object"):
        parse_arguments([str(path)])


def test_help_lists_every_option():
    text = format_help()
    for name in ("model_name_or_path", "input_dir", "split", "max_seq_length", "gradient_accumulation_steps",
                 "lr_scheduler_type", "save_total_limit", "resume_from_checkpoint", "tensor_parallel_degree",
                 "use_flash_attention", "num_hidden_layers", "peak_tflops"):
        assert f"--{name} (" in text, name
    assert "Tokens per training sample." in text


def test_flag_without_value_rejected_for_non_bool():
    with pytest.raises(ConfigError, match="--output_dir needs a value"):
        parse_arguments(["--output_dir"])
    assert parse_arguments(["--do_eval"]).training.do_eval is True
    assert parse_arguments(["--resume_from_checkpoint"]).training.resume_from_checkpoint == "true"


@pytest.mark.parametrize("argv, expected", [
    (["--learning_rate", "nan"], "learning_rate='nan': expected a finite number"),
    (["--max_grad_norm", "inf"], "max_grad_norm='inf': expected a finite number"),
    (["--seed", "-1"], "seed=-1: must be in [0, 2**32)"),
    (["--adam_epsilon", "0"], "adam_epsilon=0.0: must be positive"),
    (["--max_steps", "3", "args.json"], "The JSON argument file must come first"),
])
def test_bad_cli_numbers_rejected(argv, expected):
    with pytest.raises(ConfigError) as info:
        parse_arguments(argv)
    assert expected in str(info.value)


def test_duplicate_json_key_rejected(tmp_path):
    path = tmp_path / "dup.json"
    path.write_text('{"max_steps": 1, "max_steps": 2}')
    with pytest.raises(ConfigError, match="sets 'max_steps' twice"):
        parse_arguments([str(path)])


def test_paddlenlp_model_keys_ignored(tmp_path):
    path = write_json(tmp_path, {"tensor_parallel_output": True, "eval_accumulation_steps": 4})
    assert set(parse_arguments([path]).ignored) == {"tensor_parallel_output", "eval_accumulation_steps"}
