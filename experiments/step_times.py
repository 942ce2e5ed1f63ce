"""Paired training-step times of the Shallow CNN comparison's variants.

The training comparison (:mod:`experiments.shallow_cnn`) records each run's
epoch times, but its runs follow one another, so on a shared machine their
times are not comparable. This measures the same thing paired: one model per
variant, built as a run of the comparison builds it (seed 0, AdamW), and in
each round every model makes one training step (forward, backward, optimizer
step) on the same batch of the dataset, in a freshly shuffled order
(:class:`uan_kernels.bench.PairedRounds`). A variant's cost is the median over
rounds of its step time divided by BatchNorm's in the same round; an epoch's
training pass is ``ceil(train_size / batch_size)`` such steps, so the ratio is
also that of the epoch times.

    python -m experiments.step_times --dataset digits --threads 1

writes ``experiments/results/<dataset>/step_times.md`` and prints it.
"""
from __future__ import annotations

import argparse
import math
import platform
import sys
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence

import torch
import torch.nn.functional as F

import uan_kernels
from uan_kernels.bench import PairedRounds

from . import shallow_cnn
from .shallow_cnn import (BASE_VARIANTS, DATASETS, MULTIDOMAIN_SUFFIX, NORM_UNDER_TEST_SLOT, PER_DOMAIN_K_VARIANTS,
                          VARIANT_LABELS, ShallowCNN, SplitData, norm_factory)

BASELINE = "bn"


def training_step(data: SplitData, variant: str, batch_size: int, *, num_components: int = 3,
                  backend: str = "auto", mn_em_every: int = 1) -> Callable[[], None]:
    """One training step of ``variant``'s model on the first ``batch_size`` training examples, as a closure.

    The model and optimizer are those of a run of the comparison with seed 0
    (normalisation under test in the default slot, AdamW with its defaults).
    """
    torch.manual_seed(0)
    norm = norm_factory(variant, data.spatial_dims, num_components, backend, mn_em_every, data.num_domains)
    model = ShallowCNN(data.train_x.shape[1], data.num_classes, norm, data.spatial_dims, NORM_UNDER_TEST_SLOT)
    model = model.to(data.train_x.device).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=1e-4)
    x, y = data.train_x[:batch_size], data.train_y[:batch_size]

    def step() -> None:
        loss = F.cross_entropy(model(x), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    return step


def measure(data: SplitData, variants: Sequence[str], batch_size: int, rounds: int, **kwargs) -> PairedRounds:
    """``rounds`` paired rounds of one training step of every variant (BatchNorm included)."""
    names = [BASELINE] + [v for v in variants if v != BASELINE]
    steps = {v: training_step(data, v, batch_size, **kwargs) for v in names}
    return PairedRounds(steps, data.train_x.device).run(rounds)


def markdown(data: SplitData, paired: PairedRounds, batch_size: int, rounds: int, threads: int,
             command: str) -> str:
    """The table of step times and their per-round ratios to BatchNorm's."""
    steps_per_epoch = math.ceil(len(data.train_y) / batch_size)
    lines: List[str] = [
        f"# Training-step times, {data.name}",
        "",
        f"`{command}`: one training step (forward, backward, AdamW step) of each variant's Shallow CNN on "
        f"the same batch of {batch_size} examples of shape {tuple(data.train_x.shape[1:])}, {rounds} paired "
        f"rounds, {threads} torch thread(s), torch {torch.__version__}, uan-kernels {uan_kernels.__version__}, "
        f"{platform.machine()}. An epoch's training pass is {steps_per_epoch} such steps. Ratios are medians "
        "of per-round ratios to BatchNorm's step [interquartile range].",
        "",
        "| variant | median ms per step | × BatchNorm's step |",
        "|---|---:|---:|",
    ]
    for name in paired.times:
        seconds = paired.seconds(name).scaled(1e3)
        ratio = paired.ratio(name, BASELINE)
        lines.append(f"| {VARIANT_LABELS[name]} | {seconds.median:.2f} | "
                     f"{ratio.median:.2f} [{ratio.q1:.2f}–{ratio.q3:.2f}] |")
    return "\n".join(lines) + "\n"


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m experiments.step_times",
        description="Paired training-step times of the Shallow CNN comparison's variants, relative to BatchNorm.",
    )
    parser.add_argument("--dataset", choices=DATASETS, default="digits")
    parser.add_argument("--data-dir", type=Path, default=None, help="as for experiments.shallow_cnn")
    parser.add_argument("--variants", nargs="+", choices=tuple(VARIANT_LABELS), default=None,
                        help="default: those the comparison runs on the dataset")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--backend", default="auto", choices=uan_kernels.BACKEND_NAMES)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--num-components", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--threads", type=int, default=None, help="CPU threads for torch (default: torch's choice)")
    parser.add_argument("--out", type=Path, default=None,
                        help="default: experiments/results/<dataset>/step_times.md")
    args = parser.parse_args(argv)
    multidomain = args.dataset.endswith(MULTIDOMAIN_SUFFIX)
    if args.variants is None:
        args.variants = list(BASE_VARIANTS) + (list(PER_DOMAIN_K_VARIANTS) if multidomain else [])
    elif not multidomain and any(v in PER_DOMAIN_K_VARIANTS for v in args.variants):
        parser.error(f"{' and '.join(PER_DOMAIN_K_VARIANTS)} need a multi-domain dataset (K = D)")
    for name in ("batch_size", "num_components", "rounds", "threads"):
        value = getattr(args, name)
        if value is not None and value < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1, got {value}")
    return args


def main(argv: Optional[Sequence[str]] = None) -> Dict[str, object]:
    """Measure, write and print the table; returns the per-round times in seconds by variant."""
    args = parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    data = shallow_cnn.load_dataset(args.dataset, args.data_dir).to(torch.device(args.device))
    paired = measure(data, args.variants, args.batch_size, args.rounds, num_components=args.num_components,
                     backend=args.backend)
    command = " ".join(["python -m experiments.step_times", *(sys.argv[1:] if argv is None else argv)])
    table = markdown(data, paired, args.batch_size, args.rounds, torch.get_num_threads(), command)
    out = args.out if args.out is not None else Path("experiments") / "results" / args.dataset / "step_times.md"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(table)
    print(table, end="")
    print(f"wrote {out}")
    return dict(paired.times)


if __name__ == "__main__":
    main()
