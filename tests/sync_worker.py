"""One process of the torch.distributed group that tests/test_sync.py starts: SyncUAN scenarios.

    python tests/sync_worker.py RANK WORLD_SIZE PORT DIST_BACKEND OUT_DIR

Every process builds the same global batch and the same layers (fixed
seeds), runs its slice of the batch, and saves what it computed to
``OUT_DIR/<scenario>-<rank>.pt``; the test compares the processes' results
with each other and with one process on the whole batch. The scenarios and
the inputs are defined here, for both sides.
"""
from __future__ import annotations

import gc
import os
import sys
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Tuple

import torch

if __name__ == "__main__":
    # This checkout's package, not another installed copy.
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch.distributed as dist  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

CHANNELS = 3
COMPONENTS = 3
SPATIAL = (4, 3)


@dataclass(frozen=True)
class Scenario:
    """One SyncUAN training step (then one eval forward) with batch ``split`` (samples per rank)."""

    update: str
    backend: str
    split: Tuple[int, int]

    @property
    def name(self) -> str:
        return f"{self.update}-{self.backend}-{'x'.join(map(str, self.split))}"


SCENARIOS = [
    Scenario("weight", "cpp", (3, 3)),
    Scenario("weight", "cpp", (0, 5)),
    Scenario("moving_average", "cpp", (1, 4)),
    Scenario("moving_average", "cpp", (4, 0)),
    Scenario("weight", "triton", (2, 3)),
    Scenario("moving_average", "triton", (3, 0)),
    Scenario("weight", "reference", (3, 1)),
    Scenario("moving_average", "reference", (0, 2)),
]
DDP_STEPS = 3
DDP_BATCH = 8  # global; even split
DDP_NAME = "ddp"


def global_batch(scenario: Scenario):
    """The whole batch and the gradient reaching the layer's output, float64 on the CPU."""
    g = torch.Generator().manual_seed(11)
    shape = (sum(scenario.split), CHANNELS, *SPATIAL)
    x = torch.randn(shape, generator=g, dtype=torch.float64) * 1.5 + 0.3
    grad = torch.randn(shape, generator=g, dtype=torch.float64)
    return x, grad


def rank_slice(t: torch.Tensor, split, rank: int) -> torch.Tensor:
    start = sum(split[:rank])
    return t[start:start + split[rank]]


def make_layer(layer_type, scenario: Scenario, device, backend=None):
    """The layer of ``scenario`` (on ``backend`` if given), float64, with the same initial parameters everywhere."""
    torch.manual_seed(5)
    return layer_type(CHANNELS, COMPONENTS, update=scenario.update,
                      backend=backend or scenario.backend).double().to(device)


def make_cnn(norm_type, device) -> nn.Module:
    """A small CNN with a normalisation of each update mode, float64, the same on every process."""
    torch.manual_seed(7)
    return nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1), norm_type(4, 2), nn.ReLU(),
        nn.Conv2d(4, 4, 3, padding=1, stride=2), norm_type(4, 2, update="moving_average"), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3),
    ).double().to(device)


def cnn_batches():
    """The global batches of the DDP run: (images, labels) per step."""
    g = torch.Generator().manual_seed(13)
    return [(torch.randn(DDP_BATCH, 3, 6, 6, generator=g, dtype=torch.float64) + 0.5,
             torch.randint(0, 3, (DDP_BATCH,), generator=g)) for _ in range(DDP_STEPS)]


def train_cnn(model: nn.Module, batches, lr: float = 0.1) -> nn.Module:
    """SGD steps on the mean cross-entropy of each batch."""
    optimizer = torch.optim.SGD(model.parameters(), lr=lr)
    for images, labels in batches:
        optimizer.zero_grad()
        F.cross_entropy(model(images), labels).backward()
        optimizer.step()
    return model


def _cpu(tensors: dict) -> dict:
    return {k: v.detach().cpu().clone() for k, v in tensors.items()}


def run_scenario(scenario: Scenario, rank: int, device) -> dict:
    from uan_kernels import SyncUAN

    layer = make_layer(SyncUAN, scenario, device)
    x_all, grad_all = global_batch(scenario)
    x = rank_slice(x_all, scenario.split, rank).to(device).requires_grad_()
    out = layer(x)
    (out * rank_slice(grad_all, scenario.split, rank).to(device)).sum().backward()
    layer.eval()
    with torch.no_grad():
        eval_out = layer(x.detach())
    return {
        "out": out.detach().cpu(),
        "grad_input": x.grad.cpu(),
        "grads": {name: p.grad.cpu() for name, p in layer.named_parameters()},
        "buffers": _cpu(dict(layer.named_buffers())),
        "eval_out": eval_out.cpu(),
    }


def run_ddp(rank: int, world_size: int, device) -> dict:
    from torch.nn.parallel import DistributedDataParallel

    from uan_kernels import SyncUAN

    model = make_cnn(SyncUAN, device)
    # Buffers are not broadcast from rank 0: SyncUAN itself must keep them equal.
    ddp = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None,
                                  broadcast_buffers=False)
    share = DDP_BATCH // world_size
    batches = [(images[rank * share:(rank + 1) * share].to(device), labels[rank * share:(rank + 1) * share].to(device))
               for images, labels in cnn_batches()]
    train_cnn(ddp, batches)
    # The DDP wrapper sits in a reference cycle: left to the interpreter's exit, it is freed after
    # destroy_process_group and aborts the process (gloo, "terminate called without an active
    # exception"). Free it while the group is alive.
    del ddp
    gc.collect()
    return _cpu(model.state_dict())


def main() -> None:
    rank, world_size, port = (int(v) for v in sys.argv[1:4])
    dist_backend, out_dir = sys.argv[4], Path(sys.argv[5])
    torch.set_num_threads(1)
    device = torch.device("cuda", rank) if dist_backend == "nccl" else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    else:
        # Triton's kernels run CPU tensors under its interpreter, chosen before uan_kernels is imported.
        os.environ["TRITON_INTERPRET"] = "1"
    # A collective that waits longer than this fails the process instead of hanging it.
    dist.init_process_group(dist_backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world_size, timeout=timedelta(seconds=120))
    try:
        for scenario in SCENARIOS:
            torch.save(run_scenario(scenario, rank, device), out_dir / f"{scenario.name}-{rank}.pt")
        torch.save(run_ddp(rank, world_size, device), out_dir / f"{DDP_NAME}-{rank}.pt")
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
