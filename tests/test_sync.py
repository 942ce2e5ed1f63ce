"""SyncUAN with real processes: two ranks of a torch.distributed group on 127.0.0.1.

tests/sync_worker.py runs every scenario in each of two processes (gloo on
CPU tensors, so that CI runs it; NCCL on two GPUs where there are two), each
on its slice of a global batch, sizes uneven or zero included; this module
compares, in float64 and to 1e-10, each rank's output and input gradient with
one process's UAN on the whole batch, the ranks' parameter gradients summed
with the whole batch's, and every rank's buffers after the step with the
single process's. A DistributedDataParallel run of a small CNN must keep
parameters and buffers identical on the ranks (buffers are not broadcast)
and equal to one process training on the whole batches. The processes have a
deadline, so a hang fails the tests instead of blocking CI. Conversion and
the single-process behaviour need no second process.
"""
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from torch import nn

import sync_worker
import uan_kernels
from uan_kernels import UAN, SyncUAN

WORLD_SIZE = 2
# Seconds for both processes to start, run every scenario and exit.
DEADLINE = 300
TOL = 1e-10


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _nccl_unavailable() -> str:
    if not dist.is_nccl_available():
        return "torch is built without NCCL"
    if torch.cuda.device_count() < 2:
        return f"the NCCL run needs two CUDA devices, {torch.cuda.device_count()} here"
    return ""


@pytest.fixture(scope="module", params=["gloo", "nccl"])
def results(request, tmp_path_factory):
    """Run the worker on WORLD_SIZE processes; ``results(name, rank)`` loads what a rank saved."""
    if request.param == "nccl" and _nccl_unavailable():
        pytest.skip(_nccl_unavailable())
    out_dir = tmp_path_factory.mktemp(f"sync-{request.param}")
    port = _free_port()
    script = Path(sync_worker.__file__)
    workers = [
        subprocess.Popen([sys.executable, str(script), str(rank), str(WORLD_SIZE), str(port), request.param,
                          str(out_dir)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
        for rank in range(WORLD_SIZE)
    ]
    logs = []
    try:
        for worker in workers:
            logs.append(worker.communicate(timeout=DEADLINE)[0])
    except subprocess.TimeoutExpired:
        for worker in workers:
            worker.kill()
        pytest.fail(f"the {request.param} processes did not finish within {DEADLINE} s (a hung collective?)")
    for rank, (worker, log) in enumerate(zip(workers, logs)):
        assert worker.returncode == 0, f"rank {rank} failed:\n{log[-4000:]}"
    return lambda name, rank: torch.load(out_dir / f"{name}-{rank}.pt")


def assert_close(got, want, what):
    scale = want.abs().max().item() if want.numel() else 0.0
    torch.testing.assert_close(got, want, rtol=TOL, atol=TOL * scale, msg=lambda m: f"{what}: {m}")


def single_process_step(scenario):
    """One process's UAN (float64 reference backend) on the whole batch: the same step as the ranks'."""
    layer = sync_worker.make_layer(UAN, scenario, "cpu", backend="reference")
    x, grad = sync_worker.global_batch(scenario)
    x.requires_grad_()
    out = layer(x)
    (out * grad).sum().backward()
    layer.eval()
    with torch.no_grad():
        eval_out = layer(x.detach())
    return {
        "out": out.detach(),
        "grad_input": x.grad,
        "grads": {name: p.grad for name, p in layer.named_parameters()},
        "buffers": dict(layer.named_buffers()),
        "eval_out": eval_out,
    }


@pytest.mark.parametrize("scenario", sync_worker.SCENARIOS, ids=lambda s: s.name)
def test_ranks_compute_the_step_of_one_process_on_the_whole_batch(results, scenario):
    ranks = [results(scenario.name, rank) for rank in range(WORLD_SIZE)]
    want = single_process_step(scenario)
    for key in ("out", "grad_input", "eval_out"):
        got = torch.cat([r[key] for r in ranks])
        assert got.shape == want[key].shape, key
        assert_close(got, want[key], key)
    assert set(ranks[0]["grads"]) == set(want["grads"])
    for name, grad in want["grads"].items():
        assert_close(sum(r["grads"][name] for r in ranks), grad, f"gradient of {name} summed over ranks")
    for rank, r in enumerate(ranks):
        assert set(r["buffers"]) == set(want["buffers"])
        for name, buffer in want["buffers"].items():
            assert_close(r["buffers"][name], buffer, f"buffer {name} of rank {rank}")


def test_ddp_keeps_parameters_and_buffers_identical_and_equal_to_one_process(results):
    ranks = [results(sync_worker.DDP_NAME, rank) for rank in range(WORLD_SIZE)]
    for name, value in ranks[0].items():
        for rank in range(1, WORLD_SIZE):
            assert torch.equal(ranks[rank][name], value), f"{name} differs between rank 0 and rank {rank}"
    # DDP averages the ranks' gradients of their mean losses: with an even
    # split, the gradient of the whole batch's mean loss.
    single = sync_worker.train_cnn(sync_worker.make_cnn(UAN, "cpu"), sync_worker.cnn_batches()).state_dict()
    assert set(single) == set(ranks[0])
    for name, value in single.items():
        assert_close(ranks[0][name], value, name)


# --------------------------------------------------------------------------- #
# Without a process group, and conversion
# --------------------------------------------------------------------------- #


@pytest.mark.parametrize("update", ["weight", "moving_average"])
def test_without_torch_distributed_it_is_uan(update):
    assert not dist.is_initialized()
    torch.manual_seed(3)
    plain = UAN(5, 3, update=update).double()
    synced = SyncUAN(5, 3, update=update).double()
    synced.load_state_dict(plain.state_dict())
    x = torch.randn(4, 5, 3, 3, dtype=torch.float64)
    for layer in (plain, synced):
        layer(x.clone().requires_grad_()).square().sum().backward()
    for (name, a), b in zip(plain.state_dict().items(), synced.state_dict().values()):
        assert torch.equal(a, b), name
    for (name, a), b in zip(plain.named_parameters(), synced.parameters()):
        assert torch.equal(a.grad, b.grad), name
    plain.eval(), synced.eval()
    assert torch.equal(plain(x), synced(x))


def test_convert_sync_uan_keeps_the_layers_tensors_and_settings():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), UAN(4, 2, update="moving_average", eps=1e-3, momentum=0.2),
                          nn.Sequential(UAN(4, 3, affine=False, track_running_stats=False)))
    model[1].train(False)
    tensors = {name: t for name, t in [*model.named_parameters(), *model.named_buffers()]}
    group = object()  # any value: stored, used only by the collectives
    converted = SyncUAN.convert_sync_uan(model, process_group=group)
    assert converted is model
    layers = [converted[1], converted[2][0]]
    assert all(type(layer) is SyncUAN and layer.process_group is group for layer in layers)
    assert not converted[1].training and converted[2][0].training
    for name, t in [*converted.named_parameters(), *converted.named_buffers()]:
        assert t is tensors[name], name
    assert set(dict(converted.named_parameters())) | set(dict(converted.named_buffers())) == set(tensors)
    for layer, (update, k, eps, momentum, affine, running) in zip(
            layers, [("moving_average", 2, 1e-3, 0.2, True, True), ("weight", 3, 1e-5, 0.1, False, False)]):
        assert (layer.update, layer.num_components, layer.eps, layer.momentum, layer.affine,
                layer.track_running_stats) == (update, k, eps, momentum, affine, running)
    bare = SyncUAN.convert_sync_uan(UAN(4))
    assert type(bare) is SyncUAN and bare.process_group is None


def test_convert_batchnorm_turns_sync_batchnorm_into_sync_uan():
    group = object()
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.SyncBatchNorm(4, eps=1e-3, momentum=0.3, process_group=group),
                          nn.BatchNorm2d(4))
    converted = uan_kernels.convert_batchnorm(model, num_components=2)
    assert type(converted[1]) is SyncUAN and converted[1].process_group is group
    assert (converted[1].eps, converted[1].momentum, converted[1].num_components) == (1e-3, 0.3, 2)
    assert type(converted[2]) is UAN
    assert "process_group" in repr(converted[1])
