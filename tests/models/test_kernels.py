"""Run-time kernel selection and the fused SwiGLU path against the plain one."""

from unittest import mock

import numpy as np
import paddle

from fleetlm.models import kernels
from fleetlm.models.layers import SwiGLUMLP


def test_swiglu_selection_follows_build_and_request():
    with mock.patch.object(paddle, "is_compiled_with_cuda", return_value=True):
        assert kernels.use_fused_swiglu(True) is True
        assert kernels.selected_kernels()["swiglu"] == "fused_swiglu"
        assert kernels.use_fused_swiglu(False) is False
    with mock.patch.object(paddle, "is_compiled_with_cuda", return_value=False):
        assert kernels.use_fused_swiglu(True) is False
        assert kernels.selected_kernels()["swiglu"] == "plain"


def test_fused_swiglu_equals_plain_mlp():
    # Paddle's swiglu kernel also runs on CPU, so the fused branch can be checked here.
    paddle.seed(0)
    mlp = SwiGLUMLP(16, 24)
    x = paddle.randn([2, 5, 16])
    x.stop_gradient = False
    plain = mlp(x)
    (plain_grad,) = paddle.grad(plain.sum(), x)
    mlp.use_fused = True
    fused = mlp(x)
    (fused_grad,) = paddle.grad(fused.sum(), x)
    np.testing.assert_allclose(fused.numpy(), plain.numpy(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(fused_grad.numpy(), plain_grad.numpy(), rtol=1e-5, atol=1e-6)


def test_geglu_never_takes_fused_path():
    with mock.patch.object(paddle, "is_compiled_with_cuda", return_value=True):
        assert SwiGLUMLP(8, 8, activation="gelu", use_fused=True).use_fused is False
        assert SwiGLUMLP(8, 8, activation="silu", use_fused=True).use_fused is True
