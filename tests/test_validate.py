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
        (["--tensor_parallel_degree", "2"], 3,
         "tensor_parallel_degree=2 x pipeline_parallel_degree=1 x sharding degree=1 = 2 does not divide the 3"),
        (["--tensor_parallel_degree", "2", "--pipeline_parallel_degree", "2"], 2,
         "= 4 does not divide the 2 launched processes"),
        (["--tensor_parallel_degree", "3", "--hidden_size", "96", "--num_attention_heads", "6",
          "--num_key_value_heads", "6"], 3,
         "vocab_size=512 is not divisible by tensor_parallel_degree=3"),
        (["--tensor_parallel_degree", "4"], 4, "num_key_value_heads=2 is not divisible by tensor_parallel_degree=4"),
        (["--tensor_parallel_degree", "8", "--num_key_value_heads", "8", "--num_attention_heads", "8",
          "--intermediate_size", "100"], 8, "intermediate_size=100 is not divisible by tensor_parallel_degree=8"),
        (["--tensor_parallel_degree", "2", "--num_attention_heads", "1", "--num_key_value_heads", "1"], 2,
         "num_attention_heads=1 is not divisible by tensor_parallel_degree=2"),
        (["--sequence_parallel", "true"], 1, "sequence_parallel=true needs tensor_parallel_degree > 1"),
        (["--sequence_parallel", "true", "--tensor_parallel_degree", "2", "--max_seq_length", "33"], 2,
         "max_seq_length=33 is not divisible by tensor_parallel_degree=2"),
        (["--virtual_pp_degree", "2"], 1, "virtual_pp_degree=2 needs pipeline_parallel_degree >= 3"),
        (["--virtual_pp_degree", "2", "--pipeline_parallel_degree", "2", "--gradient_accumulation_steps", "8"], 2,
         "virtual_pp_degree=2 needs pipeline_parallel_degree >= 3 (Paddle's interleaved schedule asserts"),
        (["--pipeline_parallel_degree", "4", "--num_hidden_layers", "6", "--gradient_accumulation_steps", "4"], 4,
         "num_hidden_layers=6 is not divisible by pipeline_parallel_degree=4 x virtual_pp_degree=1 = 4"),
        (["--pipeline_parallel_degree", "3", "--virtual_pp_degree", "2", "--num_hidden_layers", "12",
          "--gradient_accumulation_steps", "4"], 3,
         "gradient accumulation steps=4 give fewer micro-batches than the interleaved 1F1B schedule needs (6)"),
        (["--pipeline_parallel_degree", "2"], 2,
         "gradient accumulation steps=1 give fewer micro-batches than the 1F1B schedule needs (2)"),
        (["--pipeline_parallel_degree", "2", "--gradient_accumulation_steps", "2", "--do_eval", "true",
          "--eval_iters", "1"], 2, "eval_iters=1 batches as the micro-batches of one 1F1B pass, which needs at least 2"),
        (["--pipeline_parallel_degree", "2", "--gradient_accumulation_steps", "2", "--sharding", "stage2",
          "--sharding_parallel_degree", "2"], 4, "sharding=stage2 cannot be combined with pipeline_parallel_degree=2"),
        (["--sharding_parallel_degree", "2"], 2, "sharding_parallel_degree=2 needs a sharding stage"),
        (["--recompute", "true", "--no_recompute_layers", "0,5"], 1,
         "no_recompute_layers=[0, 5] lists [5], outside the model's layers 0..1"),
        (["--model_name_or_path", "no/such-model"], 1,
         "model_name_or_path='no/such-model' is neither a registered model nor a directory"),
        (["--model_name_or_path", "Qwen/Qwen-7B"], 1,
         "with config.json. Did you mean 'qwen/qwen-7b'? Closest registered names: qwen/qwen-7b, "),
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
    with pytest.raises(ConfigError, match="already contains checkpoint-5.*--resume_from_checkpoint true"):
        plan("--output_dir", str(tmp_path))
    plan("--output_dir", str(tmp_path), "--resume_from_checkpoint", "true")


def test_overwrite_output_dir_named_in_existing_checkpoint_error(tmp_path):
    checkpoint = tmp_path / "checkpoint-3"
    checkpoint.mkdir()
    (checkpoint / "trainer_state.json").write_text("{}")
    with pytest.raises(ConfigError) as info:
        plan("--output_dir", str(tmp_path), "--overwrite_output_dir", "true")
    assert str(info.value).endswith(
        "or choose another output_dir. overwrite_output_dir is not supported: fleetlm never deletes checkpoints, so "
        "remove them yourself to start again in this directory."
    )
    with pytest.raises(ConfigError) as info:
        plan("--output_dir", str(tmp_path))
    assert "overwrite_output_dir is not supported" not in str(info.value)


def test_batch_contradiction_names_flags():
    with pytest.raises(ConfigError) as info:
        plan("--global_batch_size", "8", "--per_device_train_batch_size", "2", "--gradient_accumulation_steps", "2")
    assert str(info.value).endswith(
        "set only one of them, e.g. --global_batch_size 0 to keep gradient_accumulation_steps=2, or "
        "--gradient_accumulation_steps 4 to keep global_batch_size=8."
    )


@pytest.mark.parametrize(
    "argv, world_size, expected",
    [
        (["--sharding", "stage2", "--sharding_parallel_degree", "1"], 2,
         "sharding=stage2 with a sharding degree of 1 (sharding_parallel_degree=1 in a 2-process run) divides nothing: "
         "every rank keeps the whole optimizer state and gradients. Set sharding_parallel_degree above 1"),
        (["--sharding", "stage3"], 1, "sharding=stage3 with a sharding degree of 1 (sharding_parallel_degree=-1 in a "
                                      "1-process run) divides nothing"),
        (["--sharding", "stage1"], 2, None),
        ([], 1, None),
    ],
)
def test_sharding_degree_one_warned(argv, world_size, expected):
    from fleetlm.validate import sharding_warning

    args = parse_arguments(argv)
    warning = sharding_warning(args, plan_run(args, world_size).layout)
    if expected is None:
        assert warning is None
    else:
        assert warning.startswith(expected)


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


@pytest.mark.parametrize(
    "argv, world_size, degrees",
    [
        (["--tensor_parallel_degree", "2"], 4, (2, 2, 1, 1)),
        (["--pipeline_parallel_degree", "2", "--gradient_accumulation_steps", "2"], 2, (1, 1, 2, 1)),
        (["--sharding", "stage2"], 4, (1, 1, 1, 4)),
        (["--sharding", "stage1", "--sharding_parallel_degree", "2"], 4, (2, 1, 1, 2)),
        (["--tensor_parallel_degree", "2", "--sequence_parallel", "true", "--sharding", "stage3"], 4, (1, 2, 1, 2)),
        (["--pipeline_parallel_degree", "4", "--virtual_pp_degree", "2", "--num_hidden_layers", "8",
          "--gradient_accumulation_steps", "8"], 4, (1, 1, 4, 1)),
        # Backbones with steps outside the blocks (learned positions, embedding norm, position ids).
        *[(["--model_name_or_path", f"fleetlm/tiny-{family}", "--pipeline_parallel_degree", "2",
            "--gradient_accumulation_steps", "2"], 2, (1, 1, 2, 1)) for family in ("gpt", "opt", "bloom", "chatglm", "glm")],
        *[(["--model_name_or_path", f"fleetlm/tiny-{family}", "--tensor_parallel_degree", "2",
            "--sequence_parallel", "true"], 2, (1, 2, 1, 1)) for family in ("gpt", "opt", "bloom", "chatglm", "glm")],
        (["--model_name_or_path", "fleetlm/tiny-bloom", "--pipeline_parallel_degree", "4", "--virtual_pp_degree", "2",
          "--num_hidden_layers", "8", "--gradient_accumulation_steps", "8"], 4, (1, 1, 4, 1)),
    ],
)
def test_parallel_layouts_accepted(argv, world_size, degrees):
    layout = plan(*argv, world_size=world_size).layout
    assert (layout.dp_degree, layout.tp_degree, layout.pp_degree, layout.sharding_degree) == degrees


def test_sharding_ranks_split_the_batch():
    run = plan("--sharding", "stage1", "--per_device_train_batch_size", "2", "--global_batch_size", "16", world_size=4)
    assert run.layout.data_parallel_width == 4
    assert run.batch.accumulation_steps == 2


def test_recompute_left_to_parallel_engine():
    run = plan("--recompute", "true", "--recompute_granularity", "core_attn")
    assert run.model_config.recompute is False
    assert run.model_config.recompute_granularity == "core_attn"


def test_output_dir_that_is_a_file_rejected(tmp_path):
    path = tmp_path / "afile"
    path.write_text("x")
    with pytest.raises(ConfigError, match="exists and is not a directory"):
        plan("--output_dir", str(path))
    with pytest.raises(ConfigError, match="cannot be created"):
        plan("--output_dir", str(path / "sub"))


@pytest.mark.parametrize(
    "argv, expected",
    [
        (["--max_steps", "4", "--warmup_steps", "10"],
         "warmup_steps=10 is larger than max_steps=4: the learning rate rises for the whole run and peaks at 40.0% of "
         "learning_rate=0.0003 (0.00012) on the last step. Set warmup_steps to at most 4"),
        (["--max_steps", "4", "--warmup_steps", "4"], None),
        (["--max_steps", "4", "--warmup_steps", "10", "--do_train", "false", "--do_eval", "true"], None),
        (["--max_steps", "10", "--warmup_ratio", "0.9"], None),
        (["--max_steps", "10", "--warmup_steps", "5", "--decay_steps", "3"],
         "warmup_steps=5 is at least decay_steps=3, so the cosine decay has no steps: the learning rate rises to "
         "learning_rate=0.0003 on step 5, then drops to min_learning_rate=0 on step 6 and stays there for the "
         "remaining 5 of max_steps=10 steps. Set decay_steps above 5 (0 decays until max_steps), or lower the "
         "warmup below decay_steps."),
        (["--max_steps", "10", "--warmup_ratio", "0.5", "--decay_steps", "5", "--lr_scheduler_type", "linear",
          "--min_learning_rate", "1e-5"],
         "warmup_ratio=0.5 gives 5 steps, which is at least decay_steps=5, so the linear decay has no steps: the "
         "learning rate rises to learning_rate=0.0003 on step 5, then drops to min_learning_rate=1e-05 on step 6"),
        (["--max_steps", "10", "--warmup_steps", "5", "--decay_steps", "6"], None),
        (["--max_steps", "10", "--warmup_steps", "5", "--decay_steps", "3", "--lr_scheduler_type", "constant"], None),
        (["--max_steps", "10", "--warmup_steps", "5", "--decay_steps", "3", "--min_learning_rate", "3e-4"], None),
        # The run ends with the warmup, so decay_steps has no effect at all.
        (["--max_steps", "5", "--warmup_steps", "5", "--decay_steps", "3"],
         "warmup_steps=5 is at least decay_steps=3, so the cosine decay has no steps: the learning rate rises to "
         "learning_rate=0.0003 on step 5, the last of max_steps=5 steps, and never decays. Set decay_steps above 5"),
        (["--max_steps", "2", "--warmup_steps", "2", "--decay_steps", "1"],
         "warmup_steps=2 is at least decay_steps=1, so the cosine decay has no steps: the learning rate rises to "
         "learning_rate=0.0003 on step 2, the last of max_steps=2 steps, and never decays. Set decay_steps above 2 "
         "(0 decays until max_steps), or lower the warmup below decay_steps."),
    ],
)
def test_warmup_schedule_warnings(argv, expected):
    from fleetlm.validate import warmup_warning

    warning = warmup_warning(parse_arguments(argv))
    if expected is None:
        assert warning is None
    else:
        assert warning.startswith(expected)


def test_warmup_reaching_decay_drops_as_warned():
    from fleetlm.trainer.lr import build_lr_scheduler

    # The schedule behind the warning: peak on step 5 (1-based), min_learning_rate from step 6 on.
    scheduler = build_lr_scheduler(parse_arguments(["--max_steps", "10", "--warmup_steps", "5", "--decay_steps", "3",
                                                    "--min_learning_rate", "1e-5"]).training)
    rates = []
    for _ in range(10):
        rates.append(scheduler.get_lr())
        scheduler.step()
    assert rates[4] == pytest.approx(3e-4)
    assert rates[5:] == pytest.approx([1e-5] * 5)


def eval_warning(tokens, *argv, world_size=1):
    from fleetlm.data import build_pretraining_datasets
    from fleetlm.validate import eval_repeat_warning

    args = parse_arguments(["--input_dir", tokens, "--split", "95,5", "--max_seq_length", "32", "--do_eval", "true",
                            *argv])
    t = args.training
    width = plan_run(args, world_size).layout.data_parallel_width
    needed = t.eval_iters * t.per_device_eval_batch_size * width
    _, valid, _ = build_pretraining_datasets(tokens, "95,5", 32, t.seed, (0, needed, 0))
    return eval_repeat_warning(args, valid, "valid", width), valid


def test_eval_set_smaller_than_one_evaluation_warned(pattern_tokens):
    # The valid split (documents 285..299) contains 2678 tokens: (2678 - 1) // 32 = 83 samples of 33 tokens.
    warning, valid = eval_warning(pattern_tokens, "--eval_iters", "10", "--per_device_eval_batch_size", "9")
    assert valid.tokens_per_epoch == 2678
    assert valid.num_epochs == 2
    assert warning == (
        "the valid set has 83 distinct samples, but each evaluation reads eval_iters=10 x per_device_eval_batch_size=9 "
        "x data-parallel degree 1 = 90, so samples repeat within one evaluation; set eval_iters to at most 9 to read "
        "each sample once."
    )
    warning, valid = eval_warning(pattern_tokens, "--eval_iters", "9", "--per_device_eval_batch_size", "9")
    assert warning is None
    assert valid.num_epochs == 1
    warning, _ = eval_warning(pattern_tokens, "--eval_iters", "1", "--per_device_eval_batch_size", "50", world_size=2)
    assert "= 100, so samples repeat" in warning
    assert "even eval_iters=1 reads 100; lower per_device_eval_batch_size to at most 41" in warning
