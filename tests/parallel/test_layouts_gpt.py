"""Pipeline and sequence parallelism of the GPT and GLM backbones against one process.

The runs are those of test_layouts.py (4 AdamW steps, active global-norm clipping, a global batch
of 8 samples of 32 tokens, saves at steps 2 and 4, the same 1e-5 relative tolerance), on the tiny
models whose backbones do more than embedding -> blocks -> final norm:

* GPT: learned positions added after the token lookup, tied head.
* OPT: post-norm blocks with no final norm, and a 32-wide token embedding projected in and out of
  the 64-wide blocks. The runs here untie its head.
* BLOOM: ALiBi in attention, a LayerNorm right after the token lookup, and row-parallel biases that
  sequence parallelism adds after its reduce-scatter.
* ChatGLM-6B: 2D rotary positions that a pipeline stage derives inside the block.

Without rotary positions the key bias has no effect on attention: it adds q_i . b to every score of
query i, which the softmax removes. Its gradient is rounding noise (about 1e-11 against 1e-4 for
the query bias), and Adam scales that noise up to updates of similar size in every run. So the test
checks that the key bias stayed at noise level in both runs instead of comparing the two values.
"""

import os

import numpy as np
import paddle
import pytest
from run_util import RunCache
from test_layouts import (
    EIGHT_LAYERS,
    G8_ONE_READER,
    STEPS,
    TIED,
    TOLERANCE,
    assert_close,
    base_args,
    eval_records,
    records,
    relative_l2,
)

from fleetlm.arguments import ModelArguments
from fleetlm.models import build_model, load_model_config
from fleetlm.trainer.sharded_checkpoint import read_full_model

GPT = ["--model_name_or_path", "fleetlm/tiny-gpt"]
OPT_UNTIED = ["--model_name_or_path", "fleetlm/tiny-opt", "--tie_word_embeddings", "false"]
BLOOM = ["--model_name_or_path", "fleetlm/tiny-bloom"]
# With Adam's default epsilon (1e-8) glm.layers.1.input_layernorm.bias differed by 8.9e-5 under tp2 +
# sequence parallel and by 5.5e-5 under plain tp2: near-zero gradient elements whose summation-order
# noise Adam turns into full-size updates. Epsilon 1e-5 damps them (2.1e-6).
CHATGLM = ["--model_name_or_path", "fleetlm/tiny-chatglm", "--adam_epsilon", "1e-5"]
PP2 = ["--pipeline_parallel_degree", "2"]
TP2_SP = ["--tensor_parallel_degree", "2", "--sequence_parallel", "true"]

# A key bias whose norm stays below this fraction of the query bias's norm has moved by rounding
# noise only (measured: at most 3e-4 for GPT, 2e-5 for BLOOM).
NOISE_LEVEL = 1e-2

# name: (processes, reference run, arguments).
RUNS = {
    "single_gpt": (1, None, G8_ONE_READER + GPT),
    "single_opt_untied": (1, None, G8_ONE_READER + OPT_UNTIED),
    "single_bloom": (1, None, G8_ONE_READER + BLOOM),
    "single_chatglm": (1, None, G8_ONE_READER + CHATGLM),
    "single_bloom_8_layers": (1, None, EIGHT_LAYERS + BLOOM),
    "pp2_gpt_tied": (2, "single_gpt", G8_ONE_READER + GPT + TIED + PP2),
    "pp2_opt_untied": (2, "single_opt_untied", G8_ONE_READER + OPT_UNTIED + PP2),
    "tp2_sp_gpt": (2, "single_gpt", G8_ONE_READER + GPT + TP2_SP),
    "tp2_sp_bloom": (2, "single_bloom", G8_ONE_READER + BLOOM + TP2_SP),
    # Interleaved 1F1B: the embedding LayerNorm rides with the first chunk of stage 0.
    "pp4_vpp2_bloom": (4, "single_bloom_8_layers", EIGHT_LAYERS + BLOOM + ["--pipeline_parallel_degree", "4",
                                                                            "--virtual_pp_degree", "2"]),
    "pp2_chatglm": (2, "single_chatglm", G8_ONE_READER + CHATGLM + PP2),
    "tp2_sp_chatglm": (2, "single_chatglm", G8_ONE_READER + CHATGLM + TP2_SP),
}
LAYOUTS = [name for name, (_, reference, _) in RUNS.items() if reference is not None]
# Resume from step 2 of the first run in the second run's layout; compare with the second run.
RESHARDS = [("pp2_gpt_tied", "single_gpt")]


class Runs(RunCache):
    """The runs of ``RUNS`` and the resumes of ``RESHARDS``, each launched once on first request."""

    def __init__(self, tokens, root):
        super().__init__(root, lambda output_dir: base_args(tokens, output_dir))
        self.tokens = tokens

    def get(self, name):
        nproc, _, extra = RUNS[name]
        return self.launch(name, nproc, list(extra))

    def resume(self, source, target):
        checkpoint = os.path.join(self.get(source)[0], "checkpoint-2")
        nproc, _, extra = RUNS[target]
        return self.launch(f"{source}-to-{target}", nproc, list(extra) + ["--resume_from_checkpoint", checkpoint])


@pytest.fixture(scope="module")
def runs(pattern_tokens, tmp_path_factory):
    return Runs(pattern_tokens, str(tmp_path_factory.mktemp("layouts_gpt")))


@pytest.mark.parametrize("name", LAYOUTS)
def test_layout_losses_equal_single_process(runs, name):
    output_dir, _ = runs.get(name)
    reference, _ = runs.get(RUNS[name][1])
    assert [step for step, _ in records(output_dir, "loss")] == list(range(1, STEPS + 1))
    assert_close(records(output_dir, "loss"), records(reference, "loss"), f"{name} loss")
    assert_close(records(output_dir, "grad_norm"), records(reference, "grad_norm"), f"{name} grad_norm")
    assert_close(eval_records(output_dir), eval_records(reference), f"{name} eval_loss")


@pytest.mark.parametrize("name", LAYOUTS)
def test_layout_parameters_equal_single_process(runs, name):
    output_dir, _ = runs.get(name)
    reference, _ = runs.get(RUNS[name][1])
    expected = read_full_model(os.path.join(reference, f"checkpoint-{STEPS}"))
    actual = read_full_model(os.path.join(output_dir, f"checkpoint-{STEPS}"))
    assert set(actual) == set(expected)
    for key, value in expected.items():
        assert actual[key].shape == value.shape, key
        if key.startswith("gpt.") and key.endswith("self_attn.k_proj.bias"):
            query_bias = np.linalg.norm(expected[key.replace("k_proj", "q_proj")])
            for run, bias in (("reference", value), (name, actual[key])):
                assert np.linalg.norm(bias) <= NOISE_LEVEL * query_bias, f"{run} {key} trained"
            continue
        difference = relative_l2(actual[key], value)
        assert difference <= TOLERANCE, f"{name} {key}: relative difference {difference:.2e}"


@pytest.mark.parametrize("model", ["fleetlm/tiny-gpt", "fleetlm/tiny-bloom"])
def test_key_bias_gets_no_gradient(model):
    paddle.seed(5)
    config = load_model_config(ModelArguments(model_name_or_path=model))
    network = build_model(config)
    input_ids = paddle.randint(0, config.vocab_size, [4, 32])
    network(input_ids, paddle.randint(0, config.vocab_size, [4, 32])).backward()
    for index in range(config.num_hidden_layers):
        attention = network.gpt.layers[index].self_attn
        key_gradient = float(paddle.linalg.norm(attention.k_proj.bias.grad))
        query_gradient = float(paddle.linalg.norm(attention.q_proj.bias.grad))
        assert key_gradient <= 1e-5 * query_gradient, (model, index, key_gradient, query_gradient)


def test_pipeline_stages_own_backbone_steps(runs):
    # OPT's projections sit outside the blocks: project_in must train on the first stage, project_out
    # and the untied head on the last.
    output_dir, logs = runs.get("pp2_opt_untied")
    assert "pipeline: 2 blocks over 2 stages x 1 virtual chunks, tied head False" in logs
    checkpoint = os.path.join(output_dir, "checkpoint-2")
    stages = [set(paddle.load(os.path.join(checkpoint, f"model_state.tp00_pp{stage:02d}.pdparams"))["tensors"])
              for stage in (0, 1)]
    assert "gpt.project_in.weight" in stages[0]
    assert "gpt.project_out.weight" in stages[1]
    assert "lm_head.weight" in stages[1]


@pytest.mark.parametrize("source, target", RESHARDS)
def test_resume_in_other_layout(runs, source, target):
    resumed, logs = runs.resume(source, target)
    uninterrupted, _ = runs.get(target)
    assert "resumed from" in logs
    assert [step for step, _ in records(resumed, "loss")] == [3, 4]
    expected_losses = [r for r in records(uninterrupted, "loss") if r[0] > 2]
    assert_close(records(resumed, "loss"), expected_losses, f"{source} -> {target} loss")
    expected_norms = [r for r in records(uninterrupted, "grad_norm") if r[0] > 2]
    assert_close(records(resumed, "grad_norm"), expected_norms, f"{source} -> {target} grad_norm")
