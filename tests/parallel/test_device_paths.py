"""Which GPU path each switch selects, with the CUDA build simulated: AMP O2, batched p2p, stage-1 fusion.

These paths cannot run on a CPU build; the tests pin the selection logic and what it hands to Paddle.
"""

import paddle
import pytest

from fleetlm.parallel.fleet_configs import device_dependent_configs
from fleetlm.parallel.topology import Layout
from fleetlm.trainer import precision as amp


@pytest.fixture
def cuda_build(monkeypatch):
    monkeypatch.setattr(paddle, "is_compiled_with_cuda", lambda: True)


def test_bf16_on_cuda_selects_o2(cuda_build):
    selected = amp.select_precision(bf16=True, fp16=False)
    assert selected.dtype == "bfloat16"
    assert not selected.needs_loss_scaling


def test_fp16_on_cuda_selects_loss_scaling(cuda_build, monkeypatch):
    selected = amp.select_precision(bf16=False, fp16=True)
    assert selected.dtype == "float16"
    assert selected.needs_loss_scaling
    # A CPU build's GradScaler disables itself, so record what the scaler is built with instead.
    monkeypatch.setattr(paddle.amp, "GradScaler", lambda **kwargs: ("scaler", kwargs))
    assert amp.make_scaler(selected, distributed=False) == ("scaler", {"init_loss_scaling": 2.0**15})


def test_bf16_on_cpu_falls_back_to_fp32(monkeypatch):
    monkeypatch.setattr(paddle, "is_compiled_with_cuda", lambda: False)
    selected = amp.select_precision(bf16=True, fp16=False)
    assert selected.dtype is None
    assert "no CUDA" in selected.reason
    assert amp.make_scaler(selected, distributed=False) is None


def test_decorate_requests_o2_master_weights(monkeypatch):
    calls = []
    monkeypatch.setattr(paddle.amp, "decorate", lambda **kwargs: calls.append(kwargs) or ("model", "optimizer"))
    assert amp.decorate("m", "o", amp.Precision("bfloat16", "test")) == ("model", "optimizer")
    assert calls == [dict(models="m", optimizers="o", level="O2", dtype="bfloat16", master_weight=True)]
    assert amp.decorate("m", "o", amp.Precision(None, "fp32")) == ("m", "o")


def test_autocast_uses_o2_dtype(monkeypatch):
    calls = []
    monkeypatch.setattr(paddle.amp, "auto_cast", lambda **kwargs: calls.append(kwargs))
    amp.autocast(amp.Precision("float16", "test"))
    assert calls == [dict(enable=True, level="O2", dtype="float16")]


@pytest.mark.parametrize(
    "cuda, pipeline_config, batched",
    [(True, "", True), (True, "disable_batch_p2p_comm", False), (False, "", False)],
)
def test_pipeline_p2p_selection(cuda, pipeline_config, batched):
    configs, messages = device_dependent_configs(
        Layout(dp_degree=1, pp_degree=2), "", {"pipeline_parallel_config": pipeline_config}, cuda
    )
    assert configs["pp_configs"] == {"use_batch_p2p_comm": batched}
    assert messages[0].startswith("pipeline p2p: batched" if batched else "pipeline p2p: ordered")


@pytest.mark.parametrize(
    "cuda, sharding_config, fused, reason",
    [
        (True, "enable_stage1_tensor_fusion", True, "tensor fusion on"),
        (False, "enable_stage1_tensor_fusion", False, "no CPU implementation"),
        (True, "", False, "enable_stage1_tensor_fusion not set"),
    ],
)
def test_stage1_tensor_fusion_selection(cuda, sharding_config, fused, reason):
    configs, messages = device_dependent_configs(
        Layout(dp_degree=1, sharding_degree=2), "stage1", {"sharding_parallel_config": sharding_config}, cuda
    )
    assert configs["sharding_configs"] == {"tensor_fusion": fused}
    assert reason in messages[0]


def test_unapplied_tokens_logged():
    _, messages = device_dependent_configs(
        Layout(dp_degree=2), "", {"tensor_parallel_config": "enable_mp_async_allreduce"}, cuda=False
    )
    assert messages == ["tensor_parallel_config: enable_mp_async_allreduce not applied by fleetlm"]


def test_no_device_configs_for_data_parallel():
    configs, messages = device_dependent_configs(Layout(dp_degree=2), "", {}, cuda=True)
    assert configs == {}
    assert messages == []


def test_gpu_build_skips_cpu_compat(cuda_build, monkeypatch):
    from fleetlm.parallel import cpu_compat

    monkeypatch.setattr(cpu_compat, "_applied", None)
    assert cpu_compat.apply_cpu_compat() == []


@pytest.mark.parametrize(
    "select, fused_name",
    [("use_flash_attention", "flash_attention"), ("use_fused_rms_norm", "fused_rms_norm"),
     ("use_fused_rope", "fused_rotary_position_embedding")],
)
def test_fused_kernels_selected_on_cuda_only(monkeypatch, select, fused_name):
    from fleetlm.models import kernels

    monkeypatch.setattr(paddle, "is_compiled_with_cuda", lambda: True)
    assert getattr(kernels, select)(True) is True
    assert fused_name in kernels.selected_kernels().values()
    assert getattr(kernels, select)(False) is False
    monkeypatch.setattr(paddle, "is_compiled_with_cuda", lambda: False)
    assert getattr(kernels, select)(True) is False


def test_flash_attention_path_equals_plain_attention():
    """Paddle's flash_attention runs on CPU (as plain math), so the switch's code path is checked here."""
    import numpy as np

    from fleetlm.models.layers import causal_attention

    rng = np.random.default_rng(0)
    q, k, v = (paddle.to_tensor(rng.standard_normal([2, 8, 4, 16]).astype("float32")) for _ in range(3))
    k, v = k[:, :, :2], v[:, :, :2]  # grouped-query attention: 2 key/value heads for 4 query heads
    flash = causal_attention(q, k, v, use_flash=True, training=False)
    plain = causal_attention(q, k, v, use_flash=False, training=False)
    np.testing.assert_allclose(flash.numpy(), plain.numpy(), rtol=1e-5, atol=1e-6)
