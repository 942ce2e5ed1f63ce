"""Shared test set-up: the Triton interpreter on machines without a GPU, and input factories."""
import os

import torch

# Triton kernels run on CPU tensors only under the interpreter, which must be
# chosen before any @triton.jit function is defined.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

SHAPES = {
    "NC": (16, 3),
    "NCL": (4, 3, 10),
    "NCHW": (3, 3, 4, 5),
    "NCDHW": (2, 3, 2, 3, 4),
}


def make_mixture(channels, components, dtype=torch.float64, device="cpu", seed=0, requires_grad=False):
    """Random mixture parameters (mu, log_sigma, mix_logits, weight, bias) in SPEC's ranges."""
    g = torch.Generator().manual_seed(seed)
    mu = torch.rand(components, channels, generator=g, dtype=torch.float64) * 2 - 1
    log_sigma = 0.5 * torch.log(torch.nn.functional.softplus(torch.rand(components, channels, generator=g,
                                                                         dtype=torch.float64)))
    mix_logits = torch.randn(components, generator=g, dtype=torch.float64) * 0.3
    weight = 1 + 0.2 * torch.randn(channels, generator=g, dtype=torch.float64)
    bias = 0.2 * torch.randn(channels, generator=g, dtype=torch.float64)
    out = [t.to(device=device, dtype=dtype) for t in (mu, log_sigma, mix_logits, weight, bias)]
    if requires_grad:
        out = [t.requires_grad_() for t in out]
    return out


def make_input(shape, dtype=torch.float64, device="cpu", seed=1, channels_last=False, requires_grad=False):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g, dtype=torch.float64).to(device=device, dtype=dtype)
    if channels_last:
        x = x.to(memory_format=torch.channels_last if x.dim() == 4 else torch.channels_last_3d)
    return x.requires_grad_(requires_grad)


def assert_compiled_training_matches_eager(model, x, grad_rtol=None, grad_atol=None, **compile_kwargs):
    """One training step of ``torch.compile(model, **compile_kwargs)`` equals one
    eager step from the same state: output, parameter gradients, and buffers after."""
    state = {k: v.clone() for k, v in model.state_dict().items()}
    out = torch.compile(model, **compile_kwargs)(x)
    out.sum().backward()
    out = out.detach().clone()  # a CUDA graph may overwrite its output on the next replay
    grads = [p.grad.clone() for p in model.parameters()]
    after_compiled = {k: v.clone() for k, v in model.state_dict().items()}
    model.zero_grad()
    model.load_state_dict(state)
    eager = model(x)
    eager.sum().backward()
    torch.testing.assert_close(out, eager)
    for g, p in zip(grads, model.parameters()):
        torch.testing.assert_close(g, p.grad, rtol=grad_rtol, atol=grad_atol)
    for k, v in model.state_dict().items():
        torch.testing.assert_close(after_compiled[k], v)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(1234)
