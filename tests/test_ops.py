"""torch.ops.uan registration: opcheck on every schema, torch.compile, and argument checks."""
import pathlib
import subprocess
import sys

import pytest
import torch
from torch import nn

import uan_kernels
from conftest import assert_compiled_training_matches_eager, make_input, make_mixture
from uan_kernels import ops


def op_args(dtype=torch.float64, requires_grad=False, shape=(3, 4, 5, 2), channels_last=False):
    x = make_input(shape, dtype=dtype, channels_last=channels_last)
    params = make_mixture(shape[1], 3, dtype=torch.float64 if dtype == torch.float64 else torch.float32)
    if requires_grad:
        x.requires_grad_()
        for p in params:
            p.requires_grad_()
    return x, params


@pytest.mark.parametrize("requires_grad", [False, True])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_opcheck_forward(requires_grad, dtype):
    x, (mu, log_sigma, mix_logits, weight, bias) = op_args(dtype, requires_grad)
    torch.library.opcheck(torch.ops.uan.forward.default, (x, mu, log_sigma, mix_logits, weight, bias, 1e-5))
    torch.library.opcheck(torch.ops.uan.forward.default, (x, mu, log_sigma, mix_logits, None, None, 1e-5))


@pytest.mark.parametrize("requires_grad", [False, True])
@pytest.mark.parametrize("channels_last", [False, True])
def test_opcheck_forward_stats(requires_grad, channels_last):
    x, (mu, log_sigma, mix_logits, weight, bias) = op_args(requires_grad=requires_grad, channels_last=channels_last)
    mean, var = torch.randn(3, 4, dtype=torch.float64), torch.rand(3, 4, dtype=torch.float64) + 0.5
    torch.library.opcheck(torch.ops.uan.forward.stats,
                          (x, mu, log_sigma, mix_logits, mean, var, weight, bias, 1e-5))


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("mixture_grads", [True, False])
def test_opcheck_backward(training, mixture_grads):
    x, (mu, log_sigma, mix_logits, weight, _) = op_args()
    _, mean, var, mass = ops.train_forward(x, mu, log_sigma, mix_logits, weight)
    grad = torch.randn_like(x)
    torch.library.opcheck(
        torch.ops.uan.backward.default,
        (grad, x, mu, log_sigma, mix_logits, weight, mean, var, mass if training else None, 1e-5, mixture_grads),
    )


@pytest.mark.parametrize("requires_grad", [False, True])
def test_forward_mixture_is_forward_stats_with_the_mixture_statistics(requires_grad):
    x, (mu, log_sigma, mix_logits, weight, bias) = op_args(requires_grad=requires_grad)
    args = (x, mu, log_sigma, mix_logits, weight, bias, 1e-5)
    torch.library.opcheck(torch.ops.uan.forward.mixture, args)
    out = torch.ops.uan.forward.mixture(*args)
    expected = torch.ops.uan.forward.stats(x, mu, log_sigma, mix_logits, mu.detach(),
                                           torch.exp(2 * log_sigma.detach()), weight, bias, 1e-5)
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)
    if requires_grad:
        # Gradients through tau only: the statistics are constants, as in forward.stats.
        grads = torch.autograd.grad(out.sum(), (x, mu, log_sigma, mix_logits, weight, bias))
        expected_grads = torch.autograd.grad(expected.sum(), (x, mu, log_sigma, mix_logits, weight, bias))
        for got, want in zip(grads, expected_grads):
            torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def _moving_average_case(dtype, non_finite_channel=None):
    x, (mu, log_sigma, mix_logits, _, _) = op_args(dtype=dtype, shape=(6, 5, 4, 3))
    if non_finite_channel is not None:
        x[2, non_finite_channel, 1, 1] = float("nan")
    _, mean, var, mass = ops.train_forward(x, mu, log_sigma, mix_logits)
    return (mu, log_sigma, mix_logits), (mean, var, mass), x.numel() // x.shape[1]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("non_finite_channel", [None, 3])
def test_moving_average_update_op_matches_the_python_step(dtype, non_finite_channel):
    from uan_kernels.functional import moving_average_update_

    buffers, stats, values = _moving_average_case(dtype, non_finite_channel)
    fused = [b.clone() for b in buffers]
    python = [b.clone() for b in buffers]
    torch.ops.uan.moving_average_update_(*fused, *stats, values, 0.1)
    moving_average_update_(*python, *stats, values, 0.1)
    tol = 1e-12 if dtype == torch.float64 else 1e-6
    for got, want in zip(fused, python):
        torch.testing.assert_close(got, want, rtol=tol, atol=tol, equal_nan=True)
    if non_finite_channel is not None:
        # Only the channel with the NaN is poisoned; the shared mixing weights stay finite.
        assert torch.isfinite(fused[2]).all()
        others = [c for c in range(5) if c != non_finite_channel]
        assert torch.isfinite(fused[0][:, others]).all() and torch.isnan(fused[0][:, non_finite_channel]).all()


def test_opcheck_moving_average_update():
    buffers, stats, values = _moving_average_case(torch.float64)
    torch.library.opcheck(torch.ops.uan.moving_average_update_.default, (*buffers, *stats, values, 0.1))


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda a: a.update(momentum=1.5), "momentum must be in"),
        (lambda a: a.update(values=0), "values_per_channel"),
        (lambda a: a.update(mix_logits=a["mix_logits"][:2]), "mix_logits must have shape"),
        (lambda a: a.update(mass=a["mass"][:, :2]), "mass must have shape"),
        (lambda a: a.update(log_sigma=a["log_sigma"].t().contiguous().t()), "contiguous"),
    ],
)
def test_moving_average_update_rejects_bad_arguments_and_writes_nothing(mutate, message):
    (mu, log_sigma, mix_logits), (mean, var, mass), values = _moving_average_case(torch.float64)
    args = dict(mu=mu, log_sigma=log_sigma, mix_logits=mix_logits, mean=mean, var=var, mass=mass, values=values,
                momentum=0.1)
    mutate(args)
    before = [t.clone() for t in (args["mu"], args["log_sigma"], args["mix_logits"])]
    with pytest.raises(RuntimeError, match=message):
        torch.ops.uan.moving_average_update_(*args.values())
    for t, b in zip((args["mu"], args["log_sigma"], args["mix_logits"]), before):
        assert torch.equal(t, b)


def test_opcheck_empty_batch():
    x, (mu, log_sigma, mix_logits, weight, bias) = op_args(shape=(0, 4, 3))
    torch.library.opcheck(torch.ops.uan.forward.default, (x, mu, log_sigma, mix_logits, weight, bias, 1e-5))


def test_backward_skips_mixture_sums_when_not_needed():
    x, (mu, log_sigma, mix_logits, weight, _) = op_args()
    _, mean, var, mass = ops.train_forward(x, mu, log_sigma, mix_logits, weight)
    grads = torch.ops.uan.backward(torch.ones_like(x), x, mu, log_sigma, mix_logits, weight, mean, var, mass,
                                   1e-5, False)
    assert all(torch.count_nonzero(g) == 0 for g in grads[1:4])
    full = torch.ops.uan.backward(torch.ones_like(x), x, mu, log_sigma, mix_logits, weight, mean, var, mass,
                                  1e-5, True)
    torch.testing.assert_close(grads[0], full[0], rtol=0, atol=0)


@pytest.mark.parametrize("update", ["weight", "moving_average"])
def test_compile_fullgraph_small_cnn(update):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), uan_kernels.UAN(8, 3, update=update, backend="cpp"),
                          nn.ReLU(), nn.Conv2d(8, 4, 3, padding=1))
    assert_compiled_training_matches_eager(model, torch.randn(4, 3, 8, 8), fullgraph=True)


class Checkpointed(nn.Module):
    def __init__(self, block):
        super().__init__()
        self.block = block

    def forward(self, x):
        return torch.utils.checkpoint.checkpoint(self.block, x, use_reentrant=False)


@pytest.mark.parametrize("update,fullgraph", [("weight", True), ("moving_average", False)])
def test_compile_of_a_checkpointed_model_matches_eager(update, fullgraph):
    """Compiled around the checkpoint, the recomputation happens in eager code
    (a graph break, moving-average mode) or inside the compiled backward, and
    gives the eager step's gradients and estimates (which equal no
    checkpointing's, see test_modules). The convolution's weight gradient
    sums 256 float32 products per entry in an order the compiled backward
    picks (seen 2.7e-5 apart from eager), hence the gradient tolerance."""
    torch.manual_seed(0)
    model = Checkpointed(nn.Sequential(nn.Conv2d(3, 8, 3, padding=1),
                                       uan_kernels.UAN(8, 3, update=update, backend="cpp"), nn.ReLU()))
    assert_compiled_training_matches_eager(model, torch.randn(4, 3, 8, 8), grad_rtol=1e-4, grad_atol=1e-4,
                                           fullgraph=fullgraph)


@pytest.mark.parametrize(
    "mutate,message",
    [
        (lambda a: a.update(x=a["x"].int()), "input must be float16"),
        (lambda a: a.update(x=a["x"][:, :3]), "channels"),
        (lambda a: a.update(mu=a["mu"].float()), "dtype"),
        (lambda a: a.update(log_sigma=a["log_sigma"][:2]), "log_sigma must have shape"),
        (lambda a: a.update(mix_logits=a["mix_logits"][:2]), "mix_logits must have shape"),
        (lambda a: a.update(weight=a["weight"][:2]), "weight must have shape"),
        (lambda a: a.update(eps=float("nan")), "eps must be finite"),
        (lambda a: a.update(eps=0.0), "eps must be finite"),
        (lambda a: a.update(x=a["x"][0, 0, 0]), "at least 2 dims"),
        (lambda a: a.update(mu=torch.zeros(17, 4, dtype=torch.float64)), "1 to 16 components"),
    ],
)
def test_operator_rejects_bad_arguments(mutate, message):
    x, (mu, log_sigma, mix_logits, weight, bias) = op_args()
    args = dict(x=x, mu=mu, log_sigma=log_sigma, mix_logits=mix_logits, weight=weight, bias=bias, eps=1e-5)
    mutate(args)
    with pytest.raises(RuntimeError, match=message):
        torch.ops.uan.forward(*args.values())


def test_importing_the_package_registers_the_operators():
    """`import uan_kernels` alone makes torch.ops.uan.* callable (a fresh interpreter)."""
    code = ("import torch, uan_kernels\n"
            "x = torch.randn(4, 2, 3)\n"
            "mu, log_sigma, mix_logits = torch.zeros(3, 2), torch.zeros(3, 2), torch.zeros(3)\n"
            "out = torch.ops.uan.forward(x, mu, log_sigma, mix_logits, None, None, 1e-5)[0]\n"
            "assert out.shape == x.shape\n")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def test_compile_fullgraph_as_first_call_and_with_other_eps_and_momentum():
    """In a fresh interpreter, torch.compile(fullgraph=True) of a model is the
    first UAN call (the backend must already be resolved, not imported inside
    the trace), and a second model whose layers use another eps and momentum
    compiles too (the config checks must not enter the graph)."""
    code = (
        "import torch, uan_kernels\n"
        "from torch import nn\n"
        "for update in ('weight', 'moving_average'):\n"
        "    for eps, momentum in ((1e-5, 0.1), (1e-3, 0.2)):\n"
        "        model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1),\n"
        "                              uan_kernels.UAN(8, 3, update=update, eps=eps, momentum=momentum))\n"
        "        out = torch.compile(model, fullgraph=True)(torch.randn(4, 3, 8, 8))\n"
        "        out.sum().backward()\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=600)


def test_building_without_torch_stops_with_one_line_saying_what_to_run():
    """What a plain `pip install .` meets in its isolated build environment."""
    root = pathlib.Path(__file__).resolve().parents[1]
    code = "import sys; sys.modules['torch'] = None; sys.argv = ['setup.py', '--version']; exec(open('setup.py').read())"
    result = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, timeout=60)
    assert result.returncode != 0
    assert result.stderr.strip() == ("uan-kernels builds against the torch already installed: install torch first, "
                                     "then run `pip install --no-build-isolation .`")


@pytest.mark.parametrize("training", [False, True])
def test_torch_func_grad_and_vjp_match_autograd(training):
    from torch.func import functional_call, grad, vjp

    torch.manual_seed(0)
    layer = uan_kernels.UAN(4, 3).double().train(training)
    x = torch.randn(3, 4, 5, 5, dtype=torch.float64)
    params = {k: v.detach() for k, v in layer.named_parameters()}
    buffers = {k: v.clone() for k, v in layer.named_buffers()}

    def loss(p, x):
        # Running statistics passed as functional buffers (updated in the copies).
        return functional_call(layer, (p, {k: v.clone() for k, v in buffers.items()}), (x,)).square().sum()

    grads, grad_x = grad(loss, argnums=(0, 1))(params, x)
    out, pullback = vjp(lambda x: functional_call(layer, (params, buffers), (x,)), x)
    (vjp_x,) = pullback(torch.ones_like(out))

    x_ref = x.clone().requires_grad_()
    layer(x_ref).square().sum().backward()
    torch.testing.assert_close(grad_x, x_ref.grad, rtol=1e-10, atol=1e-10)
    for name, p in layer.named_parameters():
        torch.testing.assert_close(grads[name], p.grad, rtol=1e-10, atol=1e-10)
    x_ref.grad = None
    layer.load_state_dict({**params, **buffers}, strict=False)
    layer(x_ref).sum().backward()
    torch.testing.assert_close(vjp_x, x_ref.grad, rtol=1e-10, atol=1e-10)


def test_torch_func_vmap_runs_each_sample_through_the_operators():
    from torch.func import vmap

    torch.manual_seed(0)
    layer = uan_kernels.UAN(4, 3).double().eval()
    xs = torch.randn(5, 2, 4, 3, 3, dtype=torch.float64)
    with pytest.warns(UserWarning, match="no batching rule|fallback|performance"):
        batched = vmap(layer)(xs)
    torch.testing.assert_close(batched, torch.stack([layer(x) for x in xs]), rtol=1e-12, atol=1e-12)
