"""The pure-PyTorch reference: exact gradients and its closed-form special cases."""
import math

import pytest
import torch
import torch.nn.functional as F

from conftest import SHAPES, make_input, make_mixture
from uan_kernels import reference


@pytest.mark.parametrize("layout", list(SHAPES))
@pytest.mark.parametrize("learn_mixture", [True, False], ids=["update_weight", "moving_average"])
def test_gradcheck_training(layout, learn_mixture):
    x = make_input(SHAPES[layout], requires_grad=True)
    mu, log_sigma, mix_logits, weight, bias = make_mixture(x.shape[1], 3)
    for t in (mu, log_sigma, mix_logits):
        t.requires_grad_(learn_mixture)
    weight.requires_grad_()
    bias.requires_grad_()

    def fn(x, mu, log_sigma, mix_logits, weight, bias):
        return reference.uan_train(x, mu, log_sigma, mix_logits, weight, bias, 1e-5)[0]

    assert torch.autograd.gradcheck(fn, (x, mu, log_sigma, mix_logits, weight, bias))


@pytest.mark.parametrize("layout", list(SHAPES))
def test_gradcheck_eval(layout):
    x = make_input(SHAPES[layout], requires_grad=True)
    params = make_mixture(x.shape[1], 3, requires_grad=True)
    mean = torch.randn(3, x.shape[1], dtype=torch.float64)
    var = torch.rand(3, x.shape[1], dtype=torch.float64) + 0.5

    def fn(x, mu, log_sigma, mix_logits, weight, bias):
        return reference.uan_eval(x, mu, log_sigma, mix_logits, mean, var, weight, bias, 1e-5)

    assert torch.autograd.gradcheck(fn, (x, *params))


@pytest.mark.parametrize("layout", list(SHAPES))
def test_single_component_is_batchnorm(layout):
    x = make_input(SHAPES[layout]) * 3 + 1
    mu, log_sigma, mix_logits, weight, bias = make_mixture(x.shape[1], 1)
    out, mean, var, mass = reference.uan_train(x, mu, log_sigma, mix_logits, weight, bias, 1e-5)
    expected = F.batch_norm(x, None, None, weight, bias, training=True, eps=1e-5)
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)
    dims = [0] + list(range(2, x.dim()))
    torch.testing.assert_close(mean[0], x.mean(dims), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(var[0], x.var(dims, unbiased=False), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(mass[0], torch.full_like(mass[0], x.numel() / x.shape[1]))


@pytest.mark.parametrize("components", [2, 3, 5])
def test_identical_components_scale_batchnorm_by_sqrt_k(components):
    x = make_input((8, 4, 6, 6))
    mu = torch.randn(1, 4, dtype=torch.float64).expand(components, 4).clone()
    log_sigma = torch.randn(1, 4, dtype=torch.float64).expand(components, 4).clone()
    mix_logits = torch.zeros(components, dtype=torch.float64)
    out = reference.uan_train(x, mu, log_sigma, mix_logits, eps=1e-5)[0]
    expected = math.sqrt(components) * F.batch_norm(x, None, None, training=True, eps=1e-5)
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)


def test_responsibilities_stay_finite_far_from_every_component():
    x = torch.tensor([[1e4, -1e4, 3e4], [0.0, 5e3, -2e4]], dtype=torch.float32).T.contiguous()
    mu, log_sigma, mix_logits, _, _ = make_mixture(2, 3, dtype=torch.float32)
    tau = reference.responsibilities(x, mu, log_sigma, mix_logits)
    assert torch.isfinite(tau).all()
    torch.testing.assert_close(tau.sum(0), torch.ones_like(x))


def test_reduced_precision_computes_in_float32():
    x = make_input((4, 3, 5), dtype=torch.bfloat16)
    mu, log_sigma, mix_logits, weight, bias = make_mixture(3, 2, dtype=torch.float32)
    out, mean, var, mass = reference.uan_train(x, mu, log_sigma, mix_logits, weight, bias)
    assert out.dtype == torch.bfloat16
    assert mean.dtype == var.dtype == mass.dtype == torch.float32
