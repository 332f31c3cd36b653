"""Whole-run checks that need the world size, the model or the output directory."""

import os

import pytest

from fleetlm.arguments import ConfigError, parse_arguments
from fleetlm.validate import plan_run


def plan(*argv, world_size=1):
    return plan_run(parse_arguments(list(argv)), world_size)


def test_data_parallel_degree_derived():
    run = plan("--per_device_train_batch_size", "2", "--gradient_accumulation_steps", "3", world_size=4)
    assert run.layout.dp_degree == 4
    assert run.batch.global_batch_size == 2 * 3 * 4


def test_global_batch_size_derives_accumulation():
    run = plan("--per_device_train_batch_size", "2", "--global_batch_size", "16", world_size=2)
    assert run.batch.accumulation_steps == 4


@pytest.mark.parametrize(
    "argv, world_size, expected",
    [
        (["--global_batch_size", "10", "--per_device_train_batch_size", "4"], 1,
         "global_batch_size=10 is not divisible by per_device_train_batch_size=4 x data-parallel degree 1 = 4"),
        (["--global_batch_size", "16", "--per_device_train_batch_size", "2", "--gradient_accumulation_steps", "3"], 2,
         "gradient_accumulation_steps=3 contradicts global_batch_size=16"),
        (["--max_seq_length", "2048"], 1,
         "max_seq_length=2048 is longer than the model's max_position_embeddings=1024"),
        (["--tensor_parallel_degree", "2"], 2, "tensor_parallel_degree=2 is not supported yet"),
        (["--pipeline_parallel_degree", "2"], 2, "pipeline_parallel_degree=2 is not supported yet"),
        (["--sharding", "stage2"], 2, "sharding='stage2' is not supported yet"),
        (["--sequence_parallel", "true"], 1, "sequence_parallel=True is not supported yet"),
        (["--virtual_pp_degree", "2"], 1, "virtual_pp_degree=2 is not supported yet"),
        (["--recompute", "true", "--recompute_granularity", "core_attn"], 1,
         "recompute_granularity='core_attn' is not supported yet"),
        (["--model_name_or_path", "no/such-model"], 1,
         "model_name_or_path='no/such-model' is neither a registered model nor a directory"),
        (["--num_attention_heads", "3"], 1, "hidden_size=64 is not divisible by num_attention_heads=3"),
        (["--num_key_value_heads", "3"], 1, "num_attention_heads=4 is not divisible by num_key_value_heads=3"),
        (["--continue_training", "true"], 1, "continue_training=true needs weights"),
        (["--do_train", "false"], 1, "nothing to run"),
    ],
)
def test_invalid_runs_rejected(argv, world_size, expected):
    with pytest.raises(ConfigError) as info:
        plan(*argv, world_size=world_size)
    assert expected in str(info.value)


def test_existing_checkpoint_not_overwritten(tmp_path):
    checkpoint = tmp_path / "checkpoint-5"
    checkpoint.mkdir()
    (checkpoint / "trainer_state.json").write_text("{}")
    with pytest.raises(ConfigError, match="already holds checkpoint-5.*--resume_from_checkpoint true"):
        plan("--output_dir", str(tmp_path))
    plan("--output_dir", str(tmp_path), "--resume_from_checkpoint", "true")


def test_tokenizer_larger_than_vocab_rejected():
    gpt2 = os.path.join(os.path.dirname(__file__), "assets", "tokenizers", "gpt2", "gpt2.tiktoken")
    with pytest.raises(ConfigError, match="has 50257 ids but the model's vocab_size is 512"):
        plan("--tokenizer_name_or_path", gpt2)
    plan("--tokenizer_name_or_path", gpt2, "--vocab_size", "50304")


def test_model_overrides_applied():
    run = plan("--model_name_or_path", "meta-llama/Llama-2-70b", "--num_hidden_layers", "2", "--max_seq_length", "128")
    assert run.model_config.num_hidden_layers == 2
    assert run.model_config.num_key_value_heads == 8
    assert run.model_config.hidden_size == 8192
