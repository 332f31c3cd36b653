"""Single-process checks of apply_cpu_compat(): GPU builds untouched, idempotence, version warning."""

import inspect

import paddle
import pytest

from fleetlm.parallel import cpu_compat


def test_cuda_build_gets_no_replacements(monkeypatch):
    monkeypatch.setattr(paddle, "is_compiled_with_cuda", lambda: True)
    saved = paddle.distributed.all_reduce
    assert cpu_compat.apply_cpu_compat() == []
    assert paddle.distributed.all_reduce is saved


def test_xpu_build_gets_no_replacements(monkeypatch):
    monkeypatch.setattr(paddle, "is_compiled_with_xpu", lambda: True)
    assert cpu_compat.apply_cpu_compat() == []


def test_apply_is_idempotent():
    first = cpu_compat.apply_cpu_compat()
    replaced_all_reduce = paddle.distributed.all_reduce
    second = cpu_compat.apply_cpu_compat()
    assert first
    assert second == first
    assert paddle.distributed.all_reduce is replaced_all_reduce
    assert cpu_compat.original("paddle.distributed.all_reduce") is not replaced_all_reduce


def test_unchecked_version_warns(monkeypatch):
    warnings = []
    monkeypatch.setattr(paddle, "__version__", "9.9.9")
    monkeypatch.setattr(cpu_compat, "_applied", None)
    monkeypatch.setattr(cpu_compat.logger, "warning", lambda message, *args: warnings.append(message % args))
    assert cpu_compat.apply_cpu_compat()
    assert any("9.9.9" in warning and "3.3.1" in warning for warning in warnings)


def test_original_of_unreplaced_name_raises():
    with pytest.raises(KeyError, match="has not been replaced"):
        cpu_compat.original("paddle.no_such_symbol")


def test_cpu_pipeline_configs_disable_batched_p2p():
    assert cpu_compat.cpu_pipeline_configs() == {"use_batch_p2p_comm": False}


def test_tensor_cuda_disabled_restores_method():
    saved = paddle.Tensor.cuda
    tensor = paddle.ones([2])
    with cpu_compat.tensor_cuda_disabled():
        assert tensor.cuda() is tensor
    assert paddle.Tensor.cuda is saved


def test_sharding_modules_read_cuda_flag_only_in_asserts():
    """The sharding constructors get a ``core`` whose is_compiled_with_cuda() is True; it must reach only the asserts."""
    from paddle.distributed.fleet.meta_parallel.sharding import (
        group_sharded_optimizer_stage2,
        group_sharded_stage3,
    )

    for module in (group_sharded_optimizer_stage2, group_sharded_stage3):
        source = inspect.getsource(module)
        assert source.count("core.is_compiled_with_cuda()") == 1, module.__name__
