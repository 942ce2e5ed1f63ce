"""Tests of the Triton backend's kernels and operators (the ``uan_kernels.triton`` package).

Without a GPU the kernels run on CPU tensors under the Triton interpreter,
which is slow: shapes are small, and the few larger ones are chosen to give
several tiles per program and several programs per channel, so that every
merge of partial results is exercised.
"""
import os

import torch

# The interpreter must be chosen before any @triton.jit function is defined.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch.nn.functional as F  # noqa: E402

pytest.importorskip("triton", reason="the Triton backend needs the triton package")

from conftest import SHAPES, make_input, make_mixture  # noqa: E402
from uan_kernels import reference  # noqa: E402
from uan_kernels import triton as uan_triton  # noqa: E402
from uan_kernels.triton import geometry, interpreter  # noqa: E402

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
if DEVICE.type == "cpu" and not interpreter.INTERPRETED:
    pytest.skip("no GPU and TRITON_INTERPRET is off: Triton cannot run here", allow_module_level=True)

EPS = 1e-5
# (N, C, L) with L = 1000: three element tiles per channel under the
# interpreter (tile 16384) split over two programs; many more on a GPU.
MULTI_TILE_SHAPE = (40, 3, 1000)


def rel_err(actual, expected):
    """Largest absolute error relative to the largest expected magnitude."""
    scale = expected.abs().max().clamp_min(1e-30)
    return ((actual.double() - expected.double()).abs().max() / scale).item()


def on_device(tensors, dtype=None):
    return [None if t is None else t.to(device=DEVICE, dtype=dtype or t.dtype) for t in tensors]


def eval_stats(channels, components, dtype=torch.float64):
    g = torch.Generator().manual_seed(5)
    mean = torch.randn(components, channels, generator=g, dtype=torch.float64) * 0.5
    var = torch.rand(components, channels, generator=g, dtype=torch.float64) + 0.5
    return on_device([mean, var], dtype)


def mixture(channels, components, dtype, affine=True, requires_grad=False):
    mu, log_sigma, mix_logits, weight, bias = on_device(make_mixture(channels, components), dtype)
    if not affine:
        weight = bias = None
    params = [mu, log_sigma, mix_logits, weight, bias]
    if requires_grad:
        for t in params:
            if t is not None:
                t.requires_grad_()
    return params


def as64(tensors):
    return [None if t is None else t.detach().double() for t in tensors]


def forward_and_grads(x, params, grad_out, stats=None, eps=EPS):
    """Output and gradients w.r.t. x and every parameter (``stats``: eval with these statistics)."""
    x = x.detach().requires_grad_()
    params = [None if p is None else p.detach().requires_grad_() for p in params]
    mu, log_sigma, mix_logits, weight, bias = params
    if stats is None:
        out = uan_triton.train_forward(x, mu, log_sigma, mix_logits, weight, bias, eps)[0]
    else:
        out = uan_triton.eval_forward(x, mu, log_sigma, mix_logits, *stats, weight, bias, eps)
    inputs = [x] + [p for p in params if p is not None]
    return [out.detach(), *torch.autograd.grad(out, inputs, grad_out)]


def reference_forward_and_grads(x, params, grad_out, stats=None, eps=EPS):
    x = x.detach().double().requires_grad_()
    params = [None if p is None else p.detach().double().requires_grad_() for p in params]
    mu, log_sigma, mix_logits, weight, bias = params
    if stats is None:
        out = reference.uan_train(x, mu, log_sigma, mix_logits, weight, bias, eps)[0]
    else:
        out = reference.uan_eval(x, mu, log_sigma, mix_logits, *as64(stats), weight, bias, eps)
    inputs = [x] + [p for p in params if p is not None]
    return [out.detach(), *torch.autograd.grad(out, inputs, grad_out.double())]


# --------------------------------------------------------------------------- #
# Agreement with the float64 reference
# --------------------------------------------------------------------------- #


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-10), (torch.float32, 1e-5)])
@pytest.mark.parametrize("affine", [True, False])
@pytest.mark.parametrize("components", [1, 3, 16])
def test_training_forward_matches_reference(dtype, tol, affine, components):
    x = make_input(SHAPES["NCHW"], dtype=dtype, device=DEVICE)
    params = mixture(x.shape[1], components, dtype, affine)
    out, mean, var, mass = uan_triton.train_forward(x, *params, EPS)
    expected = reference.uan_train(x.double(), *as64(params), EPS)
    stat_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    assert out.dtype == dtype and mean.dtype == var.dtype == mass.dtype == stat_dtype
    for got, want in zip((out, mean, var, mass), expected):
        assert rel_err(got, want) < tol


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-10), (torch.float32, 1e-5)])
@pytest.mark.parametrize("affine", [True, False])
def test_eval_forward_matches_reference(dtype, tol, affine):
    x = make_input(SHAPES["NCL"], dtype=dtype, device=DEVICE)
    params = mixture(x.shape[1], 3, dtype, affine)
    stats = eval_stats(x.shape[1], 3, dtype)
    mu, log_sigma, mix_logits, weight, bias = params
    out = uan_triton.eval_forward(x, mu, log_sigma, mix_logits, *stats, weight, bias, EPS)
    want = reference.uan_eval(x.double(), *as64([mu, log_sigma, mix_logits, *stats, weight, bias]), EPS)
    assert out.dtype == dtype
    assert rel_err(out, want) < tol


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
def test_reduced_precision_within_twice_batchnorm_error(dtype, train):
    """float16/bfloat16 output error (vs a float32 reference on the same rounded
    data) is at most twice BatchNorm's own error on that data in that dtype."""
    x = (make_input((8, 4, 8, 8), device=DEVICE) * 2 + 0.5).to(dtype)
    mu, log_sigma, mix_logits, weight, bias = mixture(4, 3, torch.float32)
    mean, var = eval_stats(4, 3, torch.float32)
    if train:
        out = uan_triton.train_forward(x, mu, log_sigma, mix_logits, weight, bias, EPS)[0]
        want = reference.uan_train(x.float(), mu, log_sigma, mix_logits, weight, bias, EPS)[0]
        bn_mean = bn_var = None
    else:
        out = uan_triton.eval_forward(x, mu, log_sigma, mix_logits, mean, var, weight, bias, EPS)
        want = reference.uan_eval(x.float(), mu, log_sigma, mix_logits, mean, var, weight, bias, EPS)
        bn_mean, bn_var = mean[0], var[0]
    bn = F.batch_norm(x, bn_mean, bn_var, weight, bias, training=train, eps=EPS)  # float32 params, as under AMP
    bn_want = F.batch_norm(x.float(), bn_mean, bn_var, weight, bias, training=train, eps=EPS)
    assert out.dtype == dtype
    assert rel_err(out, want) <= 2 * rel_err(bn, bn_want)


@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
def test_multi_tile_forward_and_gradients_match_reference(train):
    """Several tiles per program and several programs: every merge of partials is used."""
    x = make_input(MULTI_TILE_SHAPE, dtype=torch.float64, device=DEVICE)
    tiles = geometry.tile_geometry(x, 3)
    assert tiles.programs >= 2
    assert tiles.tiles_per_program >= 2 or not interpreter.INTERPRETED
    params = mixture(3, 3, torch.float64)
    stats = None if train else eval_stats(3, 3)
    grad_out = make_input(x.shape, device=DEVICE, seed=7)
    got = forward_and_grads(x, params, grad_out, stats)
    want = reference_forward_and_grads(x, params, grad_out, stats)
    for g, w in zip(got, want):
        assert rel_err(g, w) < 1e-10
    if train:
        stats = uan_triton.train_forward(x, *params, EPS)[1:]
        for g, w in zip(stats, reference.uan_train(x, *params, EPS)[1:]):
            assert rel_err(g, w) < 1e-12


@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
def test_non_default_eps(train):
    """eps is a kernel constant: another value must reach every kernel."""
    x = make_input(SHAPES["NCL"], device=DEVICE)
    params = mixture(3, 3, torch.float64)
    stats = None if train else eval_stats(3, 3)
    grad_out = make_input(x.shape, device=DEVICE, seed=7)
    got = forward_and_grads(x, params, grad_out, stats, eps=0.25)
    want = reference_forward_and_grads(x, params, grad_out, stats, eps=0.25)
    for g, w in zip(got, want):
        assert rel_err(g, w) < 1e-10


# --------------------------------------------------------------------------- #
# Gradients
# --------------------------------------------------------------------------- #


@pytest.mark.parametrize("mode", ["train", "moving_average", "eval", "train_no_affine"])
def test_gradcheck(mode):
    """Exact gradients in float64; "moving_average": mixture parameters are buffers."""
    x = make_input((2, 2, 3), device=DEVICE, requires_grad=True)
    params = mixture(2, 3, torch.float64, affine=mode != "train_no_affine", requires_grad=True)
    if mode == "moving_average":
        for t in params[:3]:
            t.requires_grad_(False)
    if mode == "eval":
        stats = [t.requires_grad_() for t in eval_stats(2, 3)]
        mu, log_sigma, mix_logits, weight, bias = params

        def fn(x, mu, log_sigma, mix_logits, mean, var, weight, bias):
            return uan_triton.eval_forward(x, mu, log_sigma, mix_logits, mean, var, weight, bias, EPS)

        inputs = (x, mu, log_sigma, mix_logits, *stats, weight, bias)
    else:

        def fn(x, mu, log_sigma, mix_logits, weight, bias):
            return uan_triton.train_forward(x, mu, log_sigma, mix_logits, weight, bias, EPS)[0]

        inputs = (x, *params)
    # The variants of "train" check a random projection only: a full Jacobian
    # costs ~60 forwards, ~10 s in the interpreter.
    assert torch.autograd.gradcheck(fn, inputs, fast_mode=mode in ("moving_average", "train_no_affine"))


def test_gradgradcheck():
    """Double backward (through the reference math) is exact too."""
    x = make_input((3, 2, 4), device=DEVICE, requires_grad=True)
    params = mixture(2, 2, torch.float64, requires_grad=True)

    def fn(x, mu, log_sigma, mix_logits, weight, bias):
        return uan_triton.train_forward(x, mu, log_sigma, mix_logits, weight, bias, EPS)[0]

    # fast_mode: one random projection, as the full Jacobian takes ~1 min in the interpreter.
    assert torch.autograd.gradgradcheck(fn, (x, *params), fast_mode=True)


@pytest.mark.parametrize("layout", ["NC", "NCDHW"])
def test_gradients_match_reference_float32(layout):
    x = make_input(SHAPES[layout], dtype=torch.float32, device=DEVICE)
    params = mixture(x.shape[1], 3, torch.float32)
    grad_out = make_input(x.shape, dtype=torch.float32, device=DEVICE, seed=9)
    for stats in (None, eval_stats(x.shape[1], 3, torch.float32)):
        got = forward_and_grads(x, params, grad_out, stats)
        want = reference_forward_and_grads(x, params, grad_out, stats)
        for g, w in zip(got, want):
            assert rel_err(g, w) < 1e-4


@pytest.mark.parametrize("training", [True, False])
def test_backward_without_mixture_gradients(training):
    """mixture_grad=False returns zeros for mu, log_sigma, mix_logits and the same grad_input."""
    x = make_input(SHAPES["NCL"], device=DEVICE)
    mu, log_sigma, mix_logits, weight, _ = mixture(3, 3, torch.float64)
    grad_out = make_input(x.shape, device=DEVICE, seed=2)
    if training:
        _, mean, var, mass = uan_triton.train_forward(x, mu, log_sigma, mix_logits, weight, None, EPS)
    else:
        (mean, var), mass = eval_stats(3, 3), None
    args = (grad_out, x, mu, log_sigma, mix_logits, weight, mean, var, mass, EPS)
    full = torch.ops.uan.triton_backward(*args, True)
    skipped = torch.ops.uan.triton_backward(*args, False)
    for index in (1, 2, 3):
        assert not skipped[index].any()
    for index in (0, 4, 5, 6, 7):
        assert torch.equal(full[index], skipped[index])


def test_statistics_are_not_differentiable():
    x = make_input(SHAPES["NCL"], device=DEVICE, requires_grad=True)
    out, mean, var, mass = uan_triton.train_forward(x, *mixture(3, 3, torch.float64, requires_grad=True), EPS)
    assert out.requires_grad
    assert not (mean.requires_grad or var.requires_grad or mass.requires_grad)


# --------------------------------------------------------------------------- #
# Operator registration: opcheck and torch.compile
# --------------------------------------------------------------------------- #


def _op_inputs(requires_grad):
    x = make_input((4, 3, 5), dtype=torch.float32, device=DEVICE, requires_grad=requires_grad)
    return x, mixture(3, 2, torch.float32, requires_grad=requires_grad)


@pytest.mark.parametrize("requires_grad", [False, True])
def test_opcheck_forward(requires_grad):
    x, params = _op_inputs(requires_grad)
    torch.library.opcheck(torch.ops.uan.triton_forward.default, (x, *params, EPS))


@pytest.mark.parametrize("requires_grad", [False, True])
def test_opcheck_forward_eval(requires_grad):
    x, (mu, log_sigma, mix_logits, weight, bias) = _op_inputs(requires_grad)
    stats = [t.requires_grad_(requires_grad) for t in eval_stats(3, 2, torch.float32)]
    torch.library.opcheck(
        torch.ops.uan.triton_forward_eval.default, (x, mu, log_sigma, mix_logits, *stats, weight, bias, EPS)
    )


@pytest.mark.parametrize("requires_grad", [False, True])
def test_forward_mixture_is_eval_with_the_mixture_statistics(requires_grad):
    x, (mu, log_sigma, mix_logits, weight, bias) = _op_inputs(requires_grad)
    args = (x, mu, log_sigma, mix_logits, weight, bias, EPS)
    torch.library.opcheck(torch.ops.uan.triton_forward_mixture.default, args)
    out = uan_triton.eval_mixture_forward(*args)
    stats = (mu.detach(), torch.exp(2 * log_sigma.detach()))
    expected = uan_triton.eval_forward(x, mu, log_sigma, mix_logits, *stats, weight, bias, EPS)
    torch.testing.assert_close(out, expected, rtol=1e-6, atol=1e-6)
    if requires_grad:
        inputs = (x, mu, log_sigma, mix_logits, weight, bias)
        for got, want in zip(torch.autograd.grad(out.sum(), inputs), torch.autograd.grad(expected.sum(), inputs)):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("requires_grad", [False, True])
@pytest.mark.parametrize("training", [True, False])
def test_opcheck_backward(requires_grad, training):
    x, (mu, log_sigma, mix_logits, weight, _) = _op_inputs(False)
    if training:
        _, mean, var, mass = uan_triton.train_forward(x, mu, log_sigma, mix_logits, weight, None, EPS)
    else:
        (mean, var), mass = eval_stats(3, 2, torch.float32), None
    grad_out = make_input(x.shape, dtype=torch.float32, device=DEVICE, seed=4, requires_grad=requires_grad)
    x.requires_grad_(requires_grad)
    torch.library.opcheck(
        torch.ops.uan.triton_backward.default,
        (grad_out, x, mu, log_sigma, mix_logits, weight, mean, var, mass, EPS, True),
    )


def test_torch_compile_fullgraph():
    x = make_input(SHAPES["NCHW"], dtype=torch.float32, device=DEVICE)
    params = mixture(x.shape[1], 3, torch.float32)

    def loss_fn(x, mu, log_sigma, mix_logits, weight, bias):
        out, mean, _, _ = uan_triton.train_forward(x, mu, log_sigma, mix_logits, weight, bias, EPS)
        return (out * out).sum() + mean.sum()

    compiled = torch.compile(loss_fn, fullgraph=True)
    got = forward_and_loss_grads(compiled, x, params)
    want = forward_and_loss_grads(loss_fn, x, params)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w)


def forward_and_loss_grads(fn, x, params):
    inputs = [t.detach().requires_grad_() for t in (x, *params)]
    loss = fn(*inputs)
    return [loss.detach(), *torch.autograd.grad(loss, inputs)]


# --------------------------------------------------------------------------- #
# Layouts, shapes, determinism and numerics
# --------------------------------------------------------------------------- #


@pytest.mark.parametrize("layout", ["NC", "NCL", "channels_last", "channels_last_3d", "sliced", "permuted"])
def test_layouts(layout):
    """Strided inputs against the float64 reference; the output keeps the
    memory format. Float32, measured: at most 1.2e-6 of a tensor's largest
    entry; tolerance 5e-6."""
    shapes = {"NC": SHAPES["NC"], "NCL": SHAPES["NCL"], "channels_last": SHAPES["NCHW"],
              "channels_last_3d": SHAPES["NCDHW"], "sliced": SHAPES["NCHW"], "permuted": SHAPES["NCHW"]}
    base = make_input(shapes[layout], dtype=torch.float32, device=DEVICE)
    if layout in ("channels_last", "channels_last_3d"):
        x = base.contiguous(memory_format=getattr(torch, layout))
    elif layout == "sliced":  # channel and width slices: not dense, still viewable as (N, C, L)
        wide = torch.cat([base, base], dim=1).repeat_interleave(2, dim=-1)
        x = wide[:, : base.shape[1], :, ::2]
    elif layout == "permuted":  # H and W swapped in memory: cannot be viewed as (N, C, L)
        x = base.transpose(2, 3).contiguous().transpose(2, 3)
    else:
        x = base
    assert torch.equal(x, base)
    params = mixture(base.shape[1], 3, torch.float32)
    grad_out = make_input(base.shape, dtype=torch.float32, device=DEVICE, seed=3)
    for stats in (None, eval_stats(base.shape[1], 3, torch.float32)):
        got = forward_and_grads(x, params, grad_out, stats)
        want = reference_forward_and_grads(base, params, grad_out, stats)
        assert got[0].stride() == torch.empty_like(x).stride()
        for g, w in zip(got, want):
            assert rel_err(g, w) < 5e-6


@pytest.mark.parametrize("x_layout,grad_layout", [("contiguous", "channels_last"), ("channels_last", "contiguous")])
def test_grad_output_in_another_layout(x_layout, grad_layout):
    """grad_output in another memory format than the input, against the float64
    reference (measured: at most 9.1e-7 of a tensor's largest entry)."""
    formats = {"contiguous": torch.contiguous_format, "channels_last": torch.channels_last}
    x = make_input(SHAPES["NCHW"], dtype=torch.float32, device=DEVICE).contiguous(memory_format=formats[x_layout])
    params = mixture(x.shape[1], 3, torch.float32)
    grad_out = make_input(x.shape, dtype=torch.float32, device=DEVICE, seed=3)
    got = forward_and_grads(x, params, grad_out.contiguous(memory_format=formats[grad_layout]))
    want = reference_forward_and_grads(x, params, grad_out)
    assert got[1].is_contiguous(memory_format=formats[x_layout])
    for g, w in zip(got, want):
        assert rel_err(g, w) < 5e-6


class _GpuTensorShape:
    """What tile_geometry reads of a tensor (shape, strides, device), as if on an H100 (cuda:0)."""

    def __init__(self, shape, strides):
        self.shape, self._strides, self.device = torch.Size(shape), strides, torch.device("cuda", 0)

    def stride(self):
        return self._strides


@pytest.mark.parametrize("shape,strides", [((2, 70000, 1), (70000, 1, 1)), ((8, 100000, 9), (900000, 1, 100000)),
                                           ((4, 70000, 16), (1120000, 16, 1))])
def test_gpu_grid_stays_within_cuda_limits(monkeypatch, shape, strides):
    """More than 65535 channel tiles: they go on grid axis 0 (limit 2**31 - 1), programs on axis 1 (65535)."""
    monkeypatch.setattr(geometry, "_gpu_sm_count", lambda device_index: 132)
    tiles = geometry.tile_geometry(_GpuTensorShape(shape, strides), 3)
    assert tiles.grid == (tiles.c_tiles, tiles.programs)
    assert tiles.c_tiles * tiles.block_c >= shape[1]
    assert tiles.grid[0] < 2**31 and tiles.grid[1] <= 65535


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_runs_on_the_inputs_gpu_not_the_current_one():
    device = torch.device("cuda", 1)
    x = make_input(SHAPES["NCHW"], dtype=torch.float32, device=device)
    params = [t.to(device) for t in mixture(x.shape[1], 3, torch.float32)]
    grad_out = make_input(x.shape, dtype=torch.float32, device=device, seed=3)
    with torch.cuda.device(0):
        got = forward_and_grads(x, params, grad_out)
    want = reference_forward_and_grads(x, params, grad_out)
    for g, w in zip(got, want):
        assert g.device == device
        assert rel_err(g, w.to(device)) < 1e-4


def test_block_sizes_do_not_depend_on_batch_size():
    shapes = [(n, 16, 36, 36) for n in (1, 7, 256)]
    blocks = {
        (g.block_c, g.block_n, g.block_l, g.num_warps)
        for g in (geometry.tile_geometry(torch.empty(s, device=DEVICE).flatten(2), 3) for s in shapes)
    }
    assert len(blocks) == 1


def test_deterministic():
    """Fixed partial-sum order, no atomics: bitwise equal results on a repeat."""
    x = make_input(MULTI_TILE_SHAPE, dtype=torch.float32, device=DEVICE)
    params = mixture(3, 3, torch.float32)
    grad_out = make_input(x.shape, dtype=torch.float32, device=DEVICE, seed=3)
    first = forward_and_grads(x, params, grad_out)
    second = forward_and_grads(x, params, grad_out)
    for a, b in zip(first, second):
        assert torch.equal(a, b)


def test_values_far_from_every_component_stay_finite():
    offsets = torch.tensor([1e4, -1e4, 3e4], device=DEVICE).view(1, 3, 1)
    x = make_input(SHAPES["NCL"], dtype=torch.float32, device=DEVICE) + offsets
    params = mixture(3, 3, torch.float32)
    grad_out = make_input(x.shape, dtype=torch.float32, device=DEVICE, seed=3)
    for stats in (None, eval_stats(3, 3, torch.float32)):
        for t in forward_and_grads(x, params, grad_out, stats):
            assert torch.isfinite(t).all()
    # In float64 (where the reference resolves such logits) the values are also right.
    x, params = x.double(), as64(params)
    for got, want in zip(uan_triton.train_forward(x, *params, EPS), reference.uan_train(x, *params, EPS)):
        assert rel_err(got, want) < 1e-10


def test_large_mean_small_spread_is_accurate():
    """|mean| >> std in float32: pivot-shifted, Chan-merged sums do not cancel."""
    x = (make_input((16, 2, 32, 32), device=DEVICE) + 1e4).float()
    params = mixture(2, 3, torch.float32)
    with torch.no_grad():
        params[0] += 1e4  # components near the data, so that every one has mass
    _, mean, var, mass = uan_triton.train_forward(x, *params, EPS)
    _, want_mean, want_var, want_mass = reference.uan_train(x.double(), *as64(params), EPS)
    assert rel_err(mass, want_mass) < 1e-5
    assert rel_err(mean, want_mean) < 1e-7  # float32 rounding of a value near 1e4
    assert ((var.double() - want_var) / want_var).abs().max() < 1e-5


def test_empty_batch():
    x = make_input((0, 3, 4), dtype=torch.float32, device=DEVICE, requires_grad=True)
    params = mixture(3, 2, torch.float32)
    out, mean, var, mass = uan_triton.train_forward(x, *params, EPS)
    assert out.shape == x.shape
    assert not (mean.any() or var.any() or mass.any())
    out = uan_triton.eval_forward(x, *params[:3], *eval_stats(3, 2, torch.float32), *params[3:], EPS)
    (grad,) = torch.autograd.grad(out.sum(), x)
    assert grad.shape == x.shape


def test_rejects_too_many_components():
    x = make_input(SHAPES["NCL"], dtype=torch.float32, device=DEVICE)
    with pytest.raises(ValueError, match="1 to 16 components"):
        uan_triton.train_forward(x, *mixture(3, 17, torch.float32), EPS)
