"""Export and continue_training from checkpoints that parallel layouts wrote as per-rank model files.

Tensor-parallel, pipeline-parallel and sharding-stage-3 runs write model_state.tp*_pp*[_sd*].pdparams
files instead of one model_state.pdparams. ``python -m fleetlm.export`` and ``load_pretrained`` join
them with read_full_model. Each run trains a tiny model for 2 AdamW steps on a global batch of 8
samples of 32 tokens and saves at step 2. A layout's export must equal the export of the joined
tensors exactly, and the export of a one-process run of the same global batch to a relative 1e-5
by tensor-level L2 difference (the tolerance of tests/parallel/test_layouts.py).
A run is launched the first time a test needs it and shared by all tests of the module.
"""

import os
import shutil

import numpy as np
import paddle
import pytest
from run_util import describe, run_pretrain, train_records

from fleetlm.arguments import ConfigError
from fleetlm.export import export_checkpoint, main as export_main, read_checkpoint
from fleetlm.models import build_model
from fleetlm.models.weights import convert_to_hf, load_pretrained, read_safetensors
from fleetlm.trainer.sharded_checkpoint import read_full_model

STEPS = 2
TOLERANCE = 1e-5
# One reader with 4 micro-batches of 2, or two readers (data-parallel or stage-3 ranks) with 2 each.
G8_ONE_READER = ["--per_device_train_batch_size", "2", "--gradient_accumulation_steps", "4"]
G8_TWO_READERS = ["--per_device_train_batch_size", "2", "--gradient_accumulation_steps", "2"]
TIED = ["--tie_word_embeddings", "true"]
# A GPT key bias whose norm stays below this fraction of the query bias's norm has moved by rounding
# noise only (the level tests/parallel/test_layouts_gpt.py uses).
NOISE_LEVEL = 1e-2
GPT = ["--model_name_or_path", "fleetlm/tiny-gpt"]
TP2 = ["--tensor_parallel_degree", "2"]

# name: (processes, one-process reference run, arguments). A global batch is 8 samples in every run.
RUNS = {
    "single": (1, None, G8_ONE_READER),
    "single_tied": (1, None, G8_ONE_READER + TIED),
    "single_gpt": (1, None, G8_ONE_READER + GPT),
    "tp2": (2, "single", G8_ONE_READER + TP2),
    "pp2_tied": (2, "single_tied", G8_ONE_READER + TIED + ["--pipeline_parallel_degree", "2"]),
    "stage3": (2, "single", G8_TWO_READERS + ["--sharding", "stage3"]),
    "tp2_sp_gpt": (2, "single_gpt", G8_ONE_READER + GPT + TP2 + ["--sequence_parallel", "true"]),
}
LAYOUTS = [name for name, (_, reference, _) in RUNS.items() if reference is not None]
TOKENS = np.random.default_rng(5).integers(0, 512, size=(2, 15))


def relative_l2(actual: np.ndarray, expected: np.ndarray) -> float:
    return float(np.linalg.norm(actual - expected) / np.linalg.norm(expected))


def base_args(tokens, output_dir, steps=STEPS):
    return [
        "--input_dir", tokens, "--split", "95,5", "--max_seq_length", "32", "--learning_rate", "3e-3",
        "--warmup_steps", "2", "--logging_steps", "1", "--max_grad_norm", "0.5", "--weight_decay", "0.1",
        "--max_steps", str(steps), "--save_steps", "2", "--output_dir", output_dir, "--disable_tqdm", "true",
        "--seed", "11",
    ]


class Runs:
    """Trains each named run of ``RUNS`` once and exports its checkpoint-2 once, each on first request."""

    def __init__(self, tokens, root):
        self.tokens = tokens
        self.root = root
        self.done = {}

    def launch(self, key, nproc, extra, steps=STEPS):
        output_dir = os.path.join(self.root, key)
        result = run_pretrain(base_args(self.tokens, output_dir, steps) + extra, nproc=nproc,
                              log_dir=os.path.join(self.root, f"log-{key}"))
        assert result.returncode == 0, f"{key} failed:\n{describe(result)}"
        return output_dir, result.logs

    def checkpoint(self, name):
        """Return the run's checkpoint-2 directory, training the run first if needed."""
        if name not in self.done:
            nproc, _, extra = RUNS[name]
            output_dir, _ = self.launch(name, nproc, list(extra))
            self.done[name] = os.path.join(output_dir, f"checkpoint-{STEPS}")
        return self.done[name]

    def export(self, name):
        """Return the tensors of the run's export, exporting checkpoint-2 on first request."""
        out_dir = os.path.join(self.root, f"export-{name}")
        if not os.path.isdir(out_dir):
            assert export_main([self.checkpoint(name), out_dir]) == 0, f"export of {name} failed"
        return read_safetensors(os.path.join(out_dir, "model.safetensors"))


@pytest.fixture(scope="module")
def runs(pattern_tokens, tmp_path_factory):
    with pytest.MonkeyPatch.context() as patch:
        # Stage 3 slices only parameters above this many elements; 1024 slices the tiny model's matrices.
        patch.setenv("FLEETLM_STAGE3_SEGMENT_SIZE", "1024")
        yield Runs(pattern_tokens, str(tmp_path_factory.mktemp("export_sharded")))


@pytest.mark.parametrize("name", LAYOUTS)
def test_layout_writes_per_rank_files(runs, name):
    files = os.listdir(runs.checkpoint(name))
    assert "model_state.pdparams" not in files
    assert any(f.startswith("model_state.tp00_pp00") for f in files)


@pytest.mark.parametrize("name", LAYOUTS)
def test_export_equals_joined_shards(runs, name):
    checkpoint = runs.checkpoint(name)
    config, _ = read_checkpoint(checkpoint)
    expected = convert_to_hf(read_full_model(checkpoint), config)
    exported = runs.export(name)
    assert set(exported) == set(expected)
    for key, value in expected.items():
        assert exported[key].dtype == np.float32, key
        np.testing.assert_array_equal(exported[key], value, err_msg=f"{name} {key}")


def assert_key_bias_untrained(actual: np.ndarray, expected: np.ndarray, label: str) -> None:
    """Compare GPT-2's fused [q | k | v] bias: q and v to TOLERANCE, k only as rounding noise.

    Without rotary positions the key bias has no effect on attention, so its gradient is rounding
    noise that Adam scales up to updates of the size of the others, differently in every layout
    (tests/parallel/test_layouts_gpt.py measures it).
    """
    actual_q, actual_k, actual_v = np.split(actual, 3)
    expected_q, expected_k, expected_v = np.split(expected, 3)
    for part, (a, e) in (("q", (actual_q, expected_q)), ("v", (actual_v, expected_v))):
        difference = relative_l2(a, e)
        assert difference <= TOLERANCE, f"{label} {part} part: relative difference {difference:.2e}"
    for run, key_bias in (("layout", actual_k), ("reference", expected_k)):
        assert np.linalg.norm(key_bias) <= NOISE_LEVEL * np.linalg.norm(expected_q), f"{label} k part trained ({run})"


@pytest.mark.parametrize("name", LAYOUTS)
def test_export_equals_single_process_export(runs, name):
    exported = runs.export(name)
    expected = runs.export(RUNS[name][1])
    assert set(exported) == set(expected)
    for key, value in expected.items():
        assert exported[key].shape == value.shape, key
        if key.endswith("attn.c_attn.bias"):
            assert_key_bias_untrained(exported[key], value, f"{name} {key}")
            continue
        difference = relative_l2(exported[key], value)
        assert difference <= TOLERANCE, f"{name} {key}: relative difference {difference:.2e}"


def test_export_rejects_truncated_shard(runs, tmp_path):
    checkpoint = str(tmp_path / "checkpoint-2")
    shutil.copytree(runs.checkpoint("tp2"), checkpoint)
    shard = os.path.join(checkpoint, "model_state.tp01_pp00.pdparams")
    saved_size = os.path.getsize(shard)
    with open(shard, "r+b") as f:
        f.truncate(saved_size // 2)
    message = rf"model_state\.tp01_pp00\.pdparams is damaged \({saved_size // 2} bytes, but {saved_size} were saved\)"
    with pytest.raises(ConfigError, match=message):
        export_checkpoint(checkpoint, str(tmp_path / "export"))
    assert export_main([checkpoint, str(tmp_path / "export")]) == 2
    assert not os.path.exists(tmp_path / "export" / "model.safetensors")


def test_tp2_export_loads_in_transformers(runs):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    checkpoint = runs.checkpoint("tp2")
    runs.export("tp2")
    reference = transformers.AutoModelForCausalLM.from_pretrained(os.path.join(runs.root, "export-tp2")).eval()
    assert type(reference).__name__ == "LlamaForCausalLM"
    with torch.no_grad():
        expected = reference(torch.tensor(TOKENS)).logits.numpy()

    config, _ = read_checkpoint(checkpoint)
    model = build_model(config)
    load_pretrained(model, config, checkpoint)
    model.eval()
    difference = np.abs(model(paddle.to_tensor(TOKENS)).numpy() - expected).max()
    assert difference < 1e-4, f"max |logits difference| {difference:.2e}"


@pytest.mark.parametrize("name", LAYOUTS)
def test_load_pretrained_sets_joined_weights(runs, name):
    checkpoint = runs.checkpoint(name)
    config, _ = read_checkpoint(checkpoint)
    model = build_model(config)
    load_pretrained(model, config, checkpoint)
    expected = read_full_model(checkpoint)
    loaded = model.state_dict()
    assert set(loaded) == set(expected)
    for key, value in expected.items():
        np.testing.assert_array_equal(loaded[key].numpy(), value, err_msg=f"{name} {key}")


def test_continue_training_from_tp2_checkpoint(runs):
    # A continue_training run starts at the first batch again because no consumed samples carry over.
    # So its first loss is the step-2 weights' loss on that batch. It must be the same from the tp2
    # checkpoint as from the one-process run's checkpoint, and lower than the loss of random weights.
    losses = {}
    for source in ("tp2", "single"):
        output_dir, logs = runs.launch(f"continue-{source}", 1, G8_ONE_READER + [
            "--model_name_or_path", runs.checkpoint(source), "--continue_training", "true"], steps=1)
        assert f"loaded 21 tensors from {runs.checkpoint(source)}" in logs
        losses[source] = [record["loss"] for record in train_records(output_dir)]
    assert len(losses["tp2"]) == 1
    np.testing.assert_allclose(losses["tp2"], losses["single"], rtol=TOLERANCE)

    random_start = train_records(os.path.dirname(runs.checkpoint("single")))[0]["loss"]
    assert losses["tp2"][0] < random_start - 0.05
