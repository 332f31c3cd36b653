"""In-process checks of the parallel engine's pieces: recompute wrapping, clip counting, shard assembly."""

from types import SimpleNamespace

import numpy as np
import paddle
import pytest

from fleetlm.models import build_model, layers
from fleetlm.models.config import ModelConfig
from fleetlm.parallel.clip import GlobalNormClip, NonFiniteGradientError
from fleetlm.parallel.plan import LLAMA_PLAN
from fleetlm.parallel.recompute import apply_recompute
from fleetlm.trainer import sharded_checkpoint as shards


def tiny_model():
    paddle.seed(3)
    config = ModelConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                         num_attention_heads=2, max_position_embeddings=16)
    return build_model(config)


def count_calls(monkeypatch, module, name):
    calls = []
    inner = getattr(module, name)

    def counted(*args, **kwargs):
        calls.append(name)
        return inner(*args, **kwargs)

    monkeypatch.setattr(module, name, counted)
    return calls


def train_step(model):
    ids = paddle.to_tensor(np.arange(16).reshape([2, 8]) % 64)
    model.train()
    loss = model(ids, ids)
    loss.backward()
    return float(loss), {n: p.grad.numpy().copy() for n, p in model.named_parameters()}


@pytest.mark.parametrize(
    "granularity, skipped, expected_attention_calls",
    [(None, None, 2), ("full", None, 4), ("full_attn", None, 4), ("core_attn", None, 4), ("core_attn", [1], 3)],
)
def test_recompute_reruns_requested_part(monkeypatch, granularity, skipped, expected_attention_calls):
    model = tiny_model()
    reference_loss, reference_grads = train_step(tiny_model())
    calls = count_calls(monkeypatch, layers, "causal_attention")
    if granularity is not None:
        apply_recompute(model, LLAMA_PLAN, granularity, skipped)
    loss, grads = train_step(model)
    # Two blocks: one core-attention call each in forward, one more per recomputed block in backward.
    assert len(calls) == expected_attention_calls
    assert loss == reference_loss
    for name, grad in reference_grads.items():
        np.testing.assert_allclose(grads[name], grad, rtol=1e-6, atol=1e-9, err_msg=name)


def test_recompute_skipped_in_eval(monkeypatch):
    model = tiny_model()
    apply_recompute(model, LLAMA_PLAN, "full", None)
    model.eval()
    calls = count_calls(monkeypatch, layers, "causal_attention")
    with paddle.no_grad():
        model(paddle.to_tensor([[1, 2, 3]]))
    assert len(calls) == 2


def fake_parameter(**attributes):
    return SimpleNamespace(**attributes)


def fake_hcg(mp_rank=0, sharding_rank=0):
    return SimpleNamespace(
        get_model_parallel_rank=lambda: mp_rank,
        get_sharding_parallel_rank=lambda: sharding_rank,
        get_model_parallel_world_size=lambda: 1,
        get_pipe_parallel_world_size=lambda: 1,
        get_sharding_parallel_world_size=lambda: 1,
    )


@pytest.mark.parametrize(
    "attributes, mp_rank, sharding_rank, counted",
    [
        ({"is_distributed": True}, 1, 0, True),  # tensor-parallel shard: every rank's part counts
        ({"is_distributed": False}, 0, 0, True),  # replicated over tensor-parallel ranks: rank 0 counts it
        ({"is_distributed": False}, 1, 0, False),
        ({"is_distributed": True, "is_firstly_shared": False}, 0, 0, False),  # tied head's second copy
        ({"is_distributed": False, "unslice": True}, 0, 1, False),  # stage-3 unsliced, replicated
        ({"is_distributed": False, "unslice": True}, 0, 0, True),
    ],
)
def test_clip_counts_each_gradient_once(attributes, mp_rank, sharding_rank, counted):
    clip = GlobalNormClip(1.0, fake_hcg(mp_rank, sharding_rank))
    assert clip.counts(fake_parameter(**attributes)) is counted


def test_clip_scales_to_max_norm():
    grads = [paddle.to_tensor([3.0, 0.0]), paddle.to_tensor([[4.0]])]
    parameters = [paddle.create_parameter([2], "float32"), paddle.create_parameter([1, 1], "float32")]
    clip = GlobalNormClip(2.5)
    clip._dygraph_clip(list(zip(parameters, grads)))
    assert clip.last_norm == pytest.approx(5.0)
    np.testing.assert_allclose(grads[0].numpy(), [1.5, 0.0])
    np.testing.assert_allclose(grads[1].numpy(), [[2.0]])


def test_clip_measures_only_when_max_norm_zero():
    grad = paddle.to_tensor([3.0, 4.0])
    clip = GlobalNormClip(0.0)
    clip._dygraph_clip([(paddle.create_parameter([2], "float32"), grad)])
    assert clip.last_norm == pytest.approx(5.0)
    np.testing.assert_allclose(grad.numpy(), [3.0, 4.0])


def test_clip_raises_on_non_finite_norm():
    grad = paddle.to_tensor([float("nan"), 1.0])
    with pytest.raises(NonFiniteGradientError, match="gradient norm is nan"):
        GlobalNormClip(1.0)._dygraph_clip([(paddle.create_parameter([2], "float32"), grad)])


def test_model_shards_reassembled(tmp_path):
    full = np.arange(24, dtype="float32").reshape([4, 6])
    norm = np.ones([6], dtype="float32")
    for rank in range(2):
        paddle.save({
            "tensors": {"w": paddle.to_tensor(full[:, 3 * rank: 3 * rank + 3]), "norm": paddle.to_tensor(norm)},
            "split_axis": {"w": 1, "norm": None},
            "tp_rank": rank,
            "tp_degree": 2,
        }, str(tmp_path / f"model_state.tp{rank:02d}_pp00.pdparams"))
    whole = shards.read_full_model(str(tmp_path))
    np.testing.assert_array_equal(whole["w"], full)
    np.testing.assert_array_equal(whole["norm"], norm)


def test_stage3_slices_reassembled(tmp_path):
    full = np.arange(10, dtype="float32").reshape([2, 5])
    # Two sharding ranks hold [0, 6) and [6, 12) of the flattened tensor padded to 12 elements.
    pieces = [full.reshape([-1])[:6], np.concatenate([full.reshape([-1])[6:], np.zeros(2, "float32")])]
    for rank, (piece, start) in enumerate(zip(pieces, (0, 6))):
        paddle.save({
            "tensors": {"w": paddle.to_tensor(piece)},
            "split_axis": {"w": None},
            "tp_rank": 0,
            "tp_degree": 1,
            "slices": {"w": {"start": start, "shape": [2, 5]}},
        }, str(tmp_path / f"model_state.tp00_pp00_sd{rank:02d}.pdparams"))
    np.testing.assert_array_equal(shards.read_full_model(str(tmp_path))["w"], full)


def test_missing_model_files_named(tmp_path):
    with pytest.raises(shards.CheckpointError, match="has neither model_state.pdparams"):
        shards.read_full_model(str(tmp_path))
