"""UAN module and functional API: updates, eval formulas, state, conversion and bad input."""
import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import uan_kernels
from conftest import make_input
from uan_kernels import UAN, convert_batchnorm, functional, reference

BACKENDS = ["reference", "cpp"]


def snapshot(module):
    return {k: v.clone() for k, v in module.state_dict().items()}


def assert_state_equal(module, state):
    now = module.state_dict()
    assert now.keys() == state.keys()
    for key, value in state.items():
        assert torch.equal(now[key], value), key


@pytest.mark.parametrize("backend", BACKENDS)
def test_weight_mode_running_statistics_follow_batch(backend):
    layer = UAN(4, 3, momentum=0.2, backend=backend, dtype=torch.float64)
    x = make_input((8, 4, 5, 5))
    _, mean, var, _ = reference.uan_train(x, layer.mu, layer.log_sigma, layer.mix_logits, eps=layer.eps)
    layer(x)
    torch.testing.assert_close(layer.running_mean, 0.2 * mean.detach(), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(layer.running_var, 0.8 + 0.2 * var.detach(), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("backend", BACKENDS)
def test_moving_average_mode_is_one_online_em_step(backend):
    layer = UAN(4, 3, update="moving_average", momentum=0.3, backend=backend, dtype=torch.float64)
    assert not any(True for _ in layer.parameters() if _ is layer.mu)
    assert {"mu", "log_sigma", "mix_logits"} <= set(dict(layer.named_buffers()))
    x = make_input((8, 4, 5, 5))
    before = snapshot(layer)
    _, mean, var, mass = reference.uan_train(x, before["mu"], before["log_sigma"], before["mix_logits"])
    layer(x)
    lam = torch.softmax(before["mix_logits"], 0)
    batch_lam = mass.sum(1) / (4 * 8 * 25)
    torch.testing.assert_close(torch.softmax(layer.mix_logits, 0), 0.7 * lam + 0.3 * batch_lam, rtol=1e-10, atol=0)
    torch.testing.assert_close(layer.mu, 0.7 * before["mu"] + 0.3 * mean, rtol=1e-10, atol=1e-12)
    sigma2 = torch.exp(2 * before["log_sigma"])
    torch.testing.assert_close(torch.exp(2 * layer.log_sigma), 0.7 * sigma2 + 0.3 * var, rtol=1e-10, atol=0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_moving_average_eval_is_the_paper_inference_formula(backend):
    layer = UAN(3, 4, update="moving_average", backend=backend, dtype=torch.float64).eval()
    x = make_input((6, 3, 7))
    lam = torch.softmax(layer.mix_logits, 0)
    sigma = torch.exp(layer.log_sigma)
    xs = x.unsqueeze(0)
    mu_b, sigma_b = layer.mu[:, None, :, None], sigma[:, None, :, None]
    density = lam[:, None, None, None] / sigma_b * torch.exp(-0.5 * ((xs - mu_b) / sigma_b) ** 2)
    tau = density / density.sum(0)
    expected = (tau / lam.sqrt()[:, None, None, None] * (xs - mu_b) / torch.sqrt(sigma_b**2 + layer.eps)).sum(0)
    torch.testing.assert_close(layer(x), expected, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("update", ["weight", "moving_average"])
def test_eval_does_not_touch_state(update):
    layer = UAN(3, 2, update=update).eval()
    before = snapshot(layer)
    layer(torch.randn(4, 3, 5))
    assert_state_equal(layer, before)


def test_weight_mode_eval_uses_running_statistics():
    layer = UAN(3, 2, dtype=torch.float64)
    for _ in range(3):
        layer(make_input((8, 3, 4)) * 2 + 1)
    layer.eval()
    x = make_input((5, 3, 4), seed=7)
    expected = reference.uan_eval(x, layer.mu, layer.log_sigma, layer.mix_logits, layer.running_mean,
                                  layer.running_var, layer.weight, layer.bias, layer.eps)
    torch.testing.assert_close(layer(x), expected)


def test_without_running_stats_eval_uses_batch_statistics():
    layer = UAN(3, 2, track_running_stats=False, dtype=torch.float64)
    assert layer.running_mean is None and layer.running_var is None
    x = make_input((8, 3, 4))
    torch.testing.assert_close(layer.eval()(x), layer.train()(x))


@pytest.mark.parametrize("update", ["weight", "moving_average"])
@pytest.mark.parametrize("affine", [True, False])
def test_state_dict_round_trip(update, affine):
    layer = UAN(5, 3, update=update, affine=affine)
    layer(torch.randn(8, 5, 3, 3))
    clone = UAN(5, 3, update=update, affine=affine)
    clone.load_state_dict(layer.state_dict())
    assert_state_equal(clone, layer.state_dict())
    x = torch.randn(4, 5, 3, 3)
    torch.testing.assert_close(clone.eval()(x), layer.eval()(x))


def test_parameters_by_update_mode():
    learned = dict(UAN(4, 3).named_parameters())
    assert set(learned) == {"mu", "log_sigma", "mix_logits", "weight", "bias"}
    assert set(dict(UAN(4, 3, update="moving_average").named_parameters())) == {"weight", "bias"}
    assert set(dict(UAN(4, 3, affine=False).named_parameters())) == {"mu", "log_sigma", "mix_logits"}


@pytest.mark.parametrize("sigma_init,low,high", [("authors", 0.5 * math.log(0.6936), 0.5 * math.log(0.6982)),
                                                 ("paper", math.log(0.001), math.log(0.01))])
def test_initialisation_ranges(sigma_init, low, high):
    layer = UAN(64, 5, sigma_init=sigma_init)
    assert layer.mu.min() >= -1 and layer.mu.max() <= 1
    assert layer.log_sigma.min() >= low and layer.log_sigma.max() <= high
    torch.testing.assert_close(torch.softmax(layer.mix_logits, 0).sum(), torch.tensor(1.0))
    u = torch.exp(layer.mix_logits)
    assert (u / u.max()).min() >= 0.01 / 0.99 - 1e-6
    assert torch.equal(layer.weight, torch.ones(64)) and torch.equal(layer.bias, torch.zeros(64))


def test_extra_repr_names_the_configuration():
    text = repr(UAN(8, 4, update="moving_average", backend="reference"))
    assert "num_components=4" in text and "moving_average" in text and "reference" in text


def test_functional_matches_module():
    layer = UAN(3, 2, dtype=torch.float64)
    x = make_input((8, 3, 4))
    rm, rv = layer.running_mean.clone(), layer.running_var.clone()
    expected = functional.uan(x, layer.mu, layer.log_sigma, layer.mix_logits, layer.weight, layer.bias, rm, rv,
                              training=True, momentum=layer.momentum, eps=layer.eps)
    torch.testing.assert_close(layer(x), expected)
    torch.testing.assert_close(layer.running_mean, rm)
    torch.testing.assert_close(layer.running_var, rv)
    assert not torch.equal(rv, torch.ones_like(rv))  # the call updated it


class SmallCNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
            nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        )
        self.head = nn.Sequential(nn.Linear(8, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 4))

    def forward(self, x):
        return self.head(self.features(x))


@pytest.mark.parametrize("update", ["weight", "moving_average"])
def test_convert_batchnorm_trains_a_step(update):
    model = convert_batchnorm(SmallCNN(), num_components=3, update=update)
    layers = [m for m in model.modules() if isinstance(m, UAN)]
    assert len(layers) == 3 and not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
    assert [m.num_features for m in layers] == [8, 8, 16]
    before = copy.deepcopy(model.state_dict())
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = torch.randn(16, 3, 8, 8), torch.randint(0, 4, (16,))
    loss = F.cross_entropy(model(x), y)
    loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
    opt.step()
    changed = [k for k, v in model.state_dict().items() if not torch.equal(v, before[k])]
    assert any(k.endswith("mu") for k in changed) and any(k.endswith("running_mean") or update != "weight"
                                                          for k in changed)


def test_convert_batchnorm_keeps_batchnorm_settings():
    bn = nn.BatchNorm2d(6, eps=1e-3, momentum=0.05, dtype=torch.float64)
    with torch.no_grad():
        bn.weight.fill_(2.0)
    layer = convert_batchnorm(bn.eval(), num_components=2)
    assert isinstance(layer, UAN) and not layer.training
    assert (layer.eps, layer.momentum, layer.num_components, layer.mu.dtype) == (1e-3, 0.05, 2, torch.float64)
    assert torch.equal(layer.weight, bn.weight.detach())


# --- bad input: a clear error, and no buffer or parameter changes ----------

def _call(layer, x):
    return lambda: layer(x)


BAD_CALLS = {
    "rank_1": (ValueError, "at least 2 dims", lambda: (UAN(3), torch.randn(3))),
    "channels": (ValueError, "channels", lambda: (UAN(3), torch.randn(4, 5, 2))),
    "integer_dtype": (TypeError, "float16, bfloat16", lambda: (UAN(3), torch.ones(4, 3, 2, dtype=torch.int64))),
    "double_params_float_input": (TypeError, "dtype", lambda: (UAN(3, dtype=torch.float64), torch.randn(4, 3, 2))),
    "half_params_float_input": (TypeError, "dtype", lambda: (UAN(3, dtype=torch.float16), torch.randn(4, 3, 2))),
    "one_value_per_channel": (ValueError, "more than 1 value per channel", lambda: (UAN(3), torch.randn(1, 3))),
    "one_value_per_channel_ma": (ValueError, "more than 1 value per channel",
                                 lambda: (UAN(3, update="moving_average"), torch.randn(1, 3, 1, 1))),
    "meta_device": (ValueError, "is on cpu but input is on meta", lambda: (UAN(3), torch.randn(4, 3, 2, device="meta"))),
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", list(BAD_CALLS))
def test_bad_input_raises_and_changes_nothing(case, backend):
    error, message, build = BAD_CALLS[case]
    layer, x = build()
    layer.backend = backend
    before = snapshot(layer)
    with pytest.raises(error, match=message):
        layer(x)
    assert_state_equal(layer, before)


def test_parameter_on_wrong_device_or_shape_raises_before_updates():
    layer = UAN(3)
    before = snapshot(layer)
    with torch.no_grad():
        broken = copy.deepcopy(layer)
    broken.weight = nn.Parameter(torch.ones(4))
    with pytest.raises(ValueError, match="weight must have shape"):
        broken(torch.randn(4, 3, 2))
    assert torch.equal(broken.running_mean, before["running_mean"])
    with pytest.raises(ValueError, match="is on meta"):
        functional.uan(torch.randn(4, 3), layer.mu, layer.log_sigma, layer.mix_logits.to("meta"), training=True)


@pytest.mark.parametrize(
    "kwargs,message",
    [
        ({"num_components": 0}, "num_components"),
        ({"num_features": 0}, "num_features"),
        ({"eps": 0.0}, "eps"),
        ({"eps": -1e-5}, "eps"),
        ({"eps": float("nan")}, "eps"),
        ({"eps": float("inf")}, "eps"),
        ({"momentum": 1.5}, "momentum"),
        ({"momentum": -0.1}, "momentum"),
        ({"momentum": float("nan")}, "momentum"),
        ({"update": "gradient"}, "unknown update"),
        ({"backend": "cuda"}, "unknown backend"),
        ({"sigma_init": "random"}, "unknown sigma_init"),
        ({"update": "moving_average", "track_running_stats": False}, "track_running_stats"),
        ({"num_components": 17, "backend": "cpp"}, "at most 16"),
    ],
)
def test_bad_configuration_raises(kwargs, message):
    args = {"num_features": 4, **kwargs}
    with pytest.raises(ValueError, match=message):
        UAN(args.pop("num_features"), **args)


def test_bad_eps_at_call_time_changes_nothing():
    layer = UAN(3)
    before = snapshot(layer)
    for eps in (0.0, float("nan"), -1.0):
        with pytest.raises(ValueError, match="eps"):
            functional.uan(torch.randn(4, 3), layer.mu, layer.log_sigma, layer.mix_logits,
                           running_mean=layer.running_mean, running_var=layer.running_var, training=True, eps=eps)
    assert_state_equal(layer, before)


def test_triton_backend_without_interpreter_is_a_clear_error(monkeypatch):
    interpreter = pytest.importorskip("uan_kernels.triton.interpreter")
    monkeypatch.setattr(interpreter, "INTERPRETED", False)
    layer = UAN(3, backend="triton")
    before = snapshot(layer)
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        layer(torch.randn(4, 3, 2))
    assert_state_equal(layer, before)


def test_many_components_fall_back_to_reference_under_auto():
    layer = UAN(3, 20, dtype=torch.float64)
    x = make_input((8, 3, 4))
    expected = reference.uan_train(x, layer.mu, layer.log_sigma, layer.mix_logits, layer.weight, layer.bias)[0]
    torch.testing.assert_close(layer(x), expected)


def test_available_backends_lists_cpu_backends():
    names = uan_kernels.available_backends("cpu")
    assert "reference" in names and "cpp" in names


@pytest.mark.parametrize("use_reentrant", [False, True], ids=["non_reentrant", "reentrant"])
@pytest.mark.parametrize("backend", ["cpp", "reference"])
@pytest.mark.parametrize("update", ["weight", "moving_average"])
def test_checkpointing_gives_the_gradients_and_updates_of_no_checkpointing(update, backend, use_reentrant):
    """The recomputed forward runs inside the backward pass: it normalises with
    the mixture the step's first forward used and updates no estimate, so one
    checkpointed step leaves every gradient and buffer as one plain step."""
    torch.manual_seed(0)
    block = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), UAN(6, 3, update=update, backend=backend), nn.ReLU())
    x = torch.randn(4, 3, 6, 6, requires_grad=True)
    start = snapshot(block)

    def step(run):
        block.load_state_dict(start)
        x.grad = None
        block.zero_grad()
        run().square().sum().backward()  # reentrant checkpointing supports backward(), not autograd.grad
        return [x.grad.clone(), *(p.grad.clone() for p in block.parameters())], snapshot(block)

    plain, after_plain = step(lambda: block(x))
    checkpointed, after_checkpointed = step(
        lambda: torch.utils.checkpoint.checkpoint(block, x, use_reentrant=use_reentrant))
    for got, want in zip(checkpointed, plain):
        torch.testing.assert_close(got, want, rtol=0, atol=0)
    assert_state_equal(block, after_plain)
    assert not all(torch.equal(after_plain[k], start[k]) for k in start)  # the step did update the estimates


def test_a_function_transform_leaves_no_wrapped_mixture_on_the_module():
    """torch.func cannot run checkpointing, so a training forward under its
    transforms keeps nothing for a recomputation: a wrapper would outlive it."""
    from torch.func import functional_call, grad

    layer = UAN(4, 3, update="moving_average", dtype=torch.float64)
    x = make_input((4, 4, 5))
    buffers = {k: v.clone() for k, v in layer.named_buffers()}
    grad(lambda x: functional_call(layer, buffers, (x,)).square().sum())(x)
    assert layer._mixture_of_last_step is None
    before = (layer.mu.clone(), layer.log_sigma.clone(), layer.mix_logits.clone())
    layer(x)  # outside the transform the training forward keeps the mixture it used
    assert all(torch.equal(kept, used) for kept, used in zip(layer._mixture_of_last_step, before))


@pytest.mark.parametrize("backend", ["cpp", "triton", "reference"])
@pytest.mark.parametrize("update", ["weight", "moving_average"])
def test_empty_batch_in_training_gives_empty_output_and_changes_no_state(update, backend):
    device = "cpu"
    if backend == "triton":
        pytest.importorskip("triton", reason="the Triton backend needs the triton package")
        device = "cuda" if torch.cuda.is_available() else "cpu"  # the interpreter runs CPU tensors
    layer = UAN(4, 3, update=update, backend=backend, device=device)
    before = copy.deepcopy(layer.state_dict())
    x = torch.empty(0, 4, 3, 3, device=device, requires_grad=True)
    out = layer(x)
    assert out.shape == x.shape
    out.sum().backward()
    assert x.grad.shape == x.shape
    for name, value in layer.state_dict().items():
        assert torch.equal(value, before[name]), name
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        layer(torch.randn(1, 4, 1, 1, device=device))


@pytest.mark.parametrize("backend", ["cpp", "reference"])
@pytest.mark.parametrize("update", ["weight", "moving_average"])
def test_non_finite_value_reaches_only_its_own_channel(update, backend):
    torch.manual_seed(0)
    layer = UAN(4, 3, update=update, backend=backend)
    clean = UAN(3, 3, update=update, backend=backend)  # the same layer without channel 1
    kept = [0, 2, 3]
    with torch.no_grad():
        for name, value in clean.state_dict().items():
            full = layer.state_dict()[name]
            value.copy_(full if name == "mix_logits" else full[..., kept])
    x = torch.randn(8, 4, 5, 5)
    x[3, 1, 2, 2] = float("nan")
    out = layer(x)
    torch.testing.assert_close(out[:, kept], clean(x[:, kept]))
    assert torch.isfinite(layer.mix_logits).all()
    for name, value in clean.state_dict().items():
        torch.testing.assert_close(layer.state_dict()[name][..., kept] if name != "mix_logits"
                                   else layer.mix_logits, value)
    x = torch.randn(8, 4, 5, 5)
    for mode in (layer.train, layer.eval):
        mode()
        assert torch.isfinite(layer(x)[:, kept]).all()
