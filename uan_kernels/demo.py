"""A first look: train a small CNN for a few steps with BatchNorm, MixtureNorm and UAN.

Run ``python -m uan_kernels.demo [--steps N] [--device cpu|cuda]``. The data
is synthetic (class-dependent blobs), so it runs anywhere in seconds; it shows
that every normalisation trains, and what a training step costs with each.
"""
from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F
from torch import nn

from . import UAN, MixtureNorm, available_backends


def small_cnn(norm: nn.Module, channels: int = 32, classes: int = 4) -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, channels, 3, padding=1), nn.BatchNorm2d(channels), nn.ReLU(),
        nn.Conv2d(channels, channels, 3, padding=1), norm, nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(channels, classes),
    )


def synthetic_batch(batch: int, classes: int, generator: torch.Generator, device):
    labels = torch.randint(0, classes, (batch,), generator=generator)
    centers = torch.linspace(-1, 1, classes)[labels].view(batch, 1, 1, 1)
    images = torch.randn(batch, 3, 16, 16, generator=generator) + centers
    return images.to(device), labels.to(device)


def train(norm: nn.Module, steps: int, device, seed: int = 0):
    torch.manual_seed(seed)
    model = small_cnn(norm).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=5e-3)
    gen = torch.Generator().manual_seed(seed)
    losses, times = [], []
    for _ in range(steps):
        x, y = synthetic_batch(64, 4, gen, device)
        start = time.perf_counter()
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
        losses.append(loss.item())
    times.sort()
    return losses, times[len(times) // 2]


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    backends = available_backends(device)
    print(f"device {device}, torch {torch.__version__}, UAN backends here: {', '.join(backends)}")
    variants = {
        "BatchNorm2d": lambda: nn.BatchNorm2d(32),
        "MixtureNorm (EM every step)": lambda: MixtureNorm(32, 3),
        "UAN update=weight": lambda: UAN(32, 3),
        "UAN update=moving_average": lambda: UAN(32, 3, update="moving_average"),
    }
    print(f"{'normalisation':<30} {'first loss':>10} {'last loss':>10} {'ms/step':>9}")
    for name, make in variants.items():
        losses, step = train(make(), args.steps, device)
        print(f"{name:<30} {losses[0]:>10.3f} {sum(losses[-5:]) / 5:>10.3f} {step * 1e3:>9.2f}", flush=True)


if __name__ == "__main__":
    main()
