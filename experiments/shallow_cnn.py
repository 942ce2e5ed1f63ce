"""The paper's Shallow CNN protocol: BatchNorm vs Mixture Normalization vs UAN.

Run from the repository root::

    python -m experiments.shallow_cnn [--dataset digits|mnist1d|cifar10|cifar100] [--data-dir PATH]
        [--epochs N] [--seeds 0 1 2] [--lrs 0.001 0.005] [--variants bn mn uan_weight uan_ma]
        [--device cpu|cuda] [--backend auto] [--threads N] [--out experiments/results/<dataset>]

The network follows the authors' Shallow CNN: four 5x5 convolutions, each
followed by a normalisation and ReLU, 3x3/2 max pooling after the first three,
global average pooling and a linear head. Every normalisation is BatchNorm
except the second, which is the one under test (BatchNorm, Mixture
Normalization, UAN with ``update="weight"`` or ``update="moving_average"``).
AdamW, batch 256, K = 3 components, each learning rate and seed.

Nothing is downloaded: ``digits`` is scikit-learn's handwritten digits (shipped
with scikit-learn), ``mnist1d`` is generated offline by the ``mnist1d`` package
(and trains a 1-D version of the network), and ``cifar10``/``cifar100`` read
a local copy of the python-pickle release named by ``--data-dir``.

Writes ``results.json`` (configuration, versions, and per epoch of every run
the training loss, test accuracy and the training pass's wall and CPU time), ``curves.png`` (mean +- std over
seeds, one column per learning rate) and ``summary.md`` (the table) to ``--out``.
"""
from __future__ import annotations

import argparse
import datetime
import importlib
import importlib.metadata
import json
import math
import os
import pickle
import platform
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, TextIO, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

import uan_kernels
from uan_kernels import UAN, MixtureNorm

DATASETS = ("digits", "mnist1d", "cifar10", "cifar100")
# Epochs of the default protocol per dataset: digits is sized to finish within
# ten minutes on two CPU cores, MNIST-1D within about a quarter of an hour;
# CIFAR uses the authors' 100 epochs.
DEFAULT_EPOCHS = {"digits": 12, "mnist1d": 15, "cifar10": 100, "cifar100": 100}

VARIANT_LABELS = {
    "bn": "BatchNorm",
    "mn": "MixtureNorm",
    "uan_weight": "UAN (weight)",
    "uan_ma": "UAN (moving average)",
}
# Fixed colours, so that a variant looks the same in every panel and every run.
VARIANT_COLOURS = {"bn": "tab:blue", "mn": "tab:orange", "uan_weight": "tab:green", "uan_ma": "tab:red"}

# Output channels of the four convolutions, as in the authors' Shallow CNN.
CONV_WIDTHS = (64, 128, 128, 256)
KERNEL_SIZE = 5
# Zero-based index of the normalisation under test: the second one, as the authors did.
NORM_UNDER_TEST_SLOT = 1

DIGITS_SPLIT_SEED = 0
DIGITS_TEST_FRACTION = 0.2

CIFAR_IMAGE_SHAPE = (3, 32, 32)
EVAL_BATCH_SIZE = 1024


# ---------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------


@dataclass
class SplitData:
    """A fixed train/test split: float32 inputs ``(N, C, *S)`` and int64 labels ``(N,)``."""

    name: str
    train_x: torch.Tensor
    train_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor
    num_classes: int

    @property
    def spatial_dims(self) -> int:
        return self.train_x.dim() - 2

    def subset(self, max_train: Optional[int], max_test: Optional[int]) -> "SplitData":
        """The first ``max_train`` / ``max_test`` examples (all when None), for quick runs."""
        return SplitData(self.name, self.train_x[:max_train], self.train_y[:max_train],
                         self.test_x[:max_test], self.test_y[:max_test], self.num_classes)

    def to(self, device: torch.device) -> "SplitData":
        return SplitData(self.name, self.train_x.to(device), self.train_y.to(device),
                         self.test_x.to(device), self.test_y.to(device), self.num_classes)


def standardised_split(name: str, train_x, train_y, test_x, test_y, num_classes: int) -> SplitData:
    """Build a :class:`SplitData`, scaling each input channel to zero mean and unit
    variance with statistics of the training set only (the test set must not leak in)."""
    train_x = torch.as_tensor(train_x, dtype=torch.float32)
    test_x = torch.as_tensor(test_x, dtype=torch.float32)
    reduce_dims = [0] + list(range(2, train_x.dim()))
    mean = train_x.mean(reduce_dims, keepdim=True)
    std = train_x.std(reduce_dims, keepdim=True)
    return SplitData(
        name,
        (train_x - mean) / std,
        torch.as_tensor(train_y, dtype=torch.int64),
        (test_x - mean) / std,
        torch.as_tensor(test_y, dtype=torch.int64),
        num_classes,
    )


def _import_optional(module: str, package: str):
    """Import ``module``, or say which package to install for this dataset."""
    try:
        return importlib.import_module(module)
    except ImportError as err:
        raise ImportError(f"this dataset needs the {package!r} package: pip install {package}") from err


def load_digits_split() -> SplitData:
    """scikit-learn's handwritten digits: 1797 8x8 grey images of 10 classes, shipped
    with scikit-learn (no download); a stratified 80/20 split with a fixed seed
    (1437 train, 360 test).

    The images keep their native 8x8 size (the convolutions' padding keeps the
    size, the poolings halve it: 8, 4, 2, 1), so the last convolution sees a
    single position. Upsampling to 16x16 would cost four times the compute, too
    much for a CPU protocol of minutes.
    """
    datasets = _import_optional("sklearn.datasets", "scikit-learn")
    model_selection = _import_optional("sklearn.model_selection", "scikit-learn")
    pixels, labels = datasets.load_digits(return_X_y=True)
    train_pixels, test_pixels, train_y, test_y = model_selection.train_test_split(
        pixels, labels, test_size=DIGITS_TEST_FRACTION, stratify=labels, random_state=DIGITS_SPLIT_SEED
    )
    return standardised_split("digits", train_pixels.reshape(-1, 1, 8, 8), train_y,
                              test_pixels.reshape(-1, 1, 8, 8), test_y, 10)


def load_mnist1d_split() -> SplitData:
    """MNIST-1D (Greydanus), generated offline by the ``mnist1d`` package's generator
    with its default arguments (seed 42): 4000 train and 1000 test signals of length 40.

    ``mnist1d.get_dataset`` would try to download a pickle first; ``make_dataset``
    builds the same data locally.
    """
    generator = _import_optional("mnist1d.data", "mnist1d")
    data = generator.make_dataset(generator.get_dataset_args())
    return standardised_split(
        "mnist1d", data["x"][:, None, :], data["y"], data["x_test"][:, None, :], data["y_test"], 10
    )


@dataclass(frozen=True)
class CifarLayout:
    """Where the python-pickle release of a CIFAR dataset keeps its data."""

    folder: str  # the folder the release's archive extracts to
    train_files: Tuple[str, ...]
    test_files: Tuple[str, ...]
    label_key: bytes
    num_classes: int


CIFAR_LAYOUTS = {
    "cifar10": CifarLayout("cifar-10-batches-py", tuple(f"data_batch_{i}" for i in range(1, 6)),
                           ("test_batch",), b"labels", 10),
    "cifar100": CifarLayout("cifar-100-python", ("train",), ("test",), b"fine_labels", 100),
}


def find_cifar_folder(name: str, data_dir: Optional[os.PathLike]) -> Path:
    """``data_dir`` itself or its release sub-folder, whichever holds every expected file."""
    layout = CIFAR_LAYOUTS[name]
    expected = layout.train_files + layout.test_files
    if data_dir is None:
        raise ValueError(
            f"--dataset {name} reads a local copy: pass --data-dir, the folder holding {', '.join(expected)} "
            f"(the {layout.folder!r} folder of the python version of the dataset)"
        )
    data_dir = Path(data_dir)
    candidates = (data_dir, data_dir / layout.folder)
    for folder in candidates:
        if all((folder / file).is_file() for file in expected):
            return folder
    missing = [file for file in expected if not (data_dir / file).is_file()]
    raise FileNotFoundError(
        f"{name}: no python-pickle {name.upper()} in {data_dir} (nor in {candidates[1]}): expected the files "
        f"{', '.join(expected)}; missing from {data_dir}: {', '.join(missing)}"
    )


def read_cifar_file(path: Path, label_key: bytes, num_classes: int) -> Tuple[np.ndarray, np.ndarray]:
    """Images ``(N, 3, 32, 32)`` uint8 and labels ``(N,)`` from one python-pickle CIFAR file.

    Unpickling runs code from the file: point ``--data-dir`` only at a copy you trust.
    """
    try:
        with open(path, "rb") as handle:
            batch = pickle.load(handle, encoding="bytes")
    except OSError:
        raise
    except Exception as err:  # a corrupt pickle can raise almost any exception type
        raise ValueError(f"{path}: not a readable python pickle ({type(err).__name__}: {err})") from err
    expected = f"a dict with b'data' (N x 3072 uint8) and {label_key!r} (N labels in [0, {num_classes}))"
    if not isinstance(batch, dict) or b"data" not in batch or label_key not in batch:
        keys = sorted(batch) if isinstance(batch, dict) else type(batch).__name__
        raise ValueError(f"{path}: expected {expected}, got {keys}")
    images = np.asarray(batch[b"data"])
    labels = np.asarray(batch[label_key])
    pixels = int(np.prod(CIFAR_IMAGE_SHAPE))
    if images.dtype != np.uint8 or images.ndim != 2 or images.shape[1] != pixels:
        raise ValueError(f"{path}: expected {expected}; b'data' is {images.dtype} of shape {images.shape}")
    if labels.shape != (images.shape[0],) or labels.dtype.kind not in "iu" or \
            (labels.size and (labels.min() < 0 or labels.max() >= num_classes)):
        raise ValueError(f"{path}: expected {expected}; {label_key!r} is {labels.dtype} of shape {labels.shape}")
    return images.reshape(-1, *CIFAR_IMAGE_SHAPE), labels.astype(np.int64)


def load_cifar_split(name: str, data_dir: Optional[os.PathLike]) -> SplitData:
    """CIFAR-10 or CIFAR-100 (fine labels) from a local copy of the python-pickle
    release: the official 50000/10000 train/test split."""
    layout = CIFAR_LAYOUTS[name]
    folder = find_cifar_folder(name, data_dir)

    def read(files: Sequence[str]) -> Tuple[np.ndarray, np.ndarray]:
        parts = [read_cifar_file(folder / file, layout.label_key, layout.num_classes) for file in files]
        return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])

    train_x, train_y = read(layout.train_files)
    test_x, test_y = read(layout.test_files)
    return standardised_split(name, train_x, train_y, test_x, test_y, layout.num_classes)


def load_dataset(name: str, data_dir: Optional[os.PathLike] = None) -> SplitData:
    """The fixed split of dataset ``name`` (one of :data:`DATASETS`)."""
    if name == "digits":
        return load_digits_split()
    if name == "mnist1d":
        return load_mnist1d_split()
    if name in CIFAR_LAYOUTS:
        return load_cifar_split(name, data_dir)
    raise ValueError(f"unknown dataset {name!r}; expected one of {DATASETS}")


# ---------------------------------------------------------------------------
# Model
# ---------------------------------------------------------------------------


class ShallowCNN(nn.Module):
    """The authors' Shallow CNN, for 1-D or 2-D inputs.

    Four convolutions (5 wide, stride 1, padding 2; widths :data:`CONV_WIDTHS`),
    each followed by a normalisation and ReLU; 3x3 (or 3) max pooling with stride
    2 after the first three; global average pooling and a linear head.
    ``norms[NORM_UNDER_TEST_SLOT]`` is ``norm_under_test(channels)``, the others
    are BatchNorm.
    """

    def __init__(self, in_channels: int, num_classes: int, norm_under_test: Callable[[int], nn.Module],
                 spatial_dims: int = 2) -> None:
        super().__init__()
        layers = {1: (nn.Conv1d, nn.BatchNorm1d, nn.MaxPool1d), 2: (nn.Conv2d, nn.BatchNorm2d, nn.MaxPool2d)}
        if spatial_dims not in layers:
            raise ValueError(f"ShallowCNN supports 1-D and 2-D inputs, got spatial_dims={spatial_dims}")
        conv, batch_norm, max_pool = layers[spatial_dims]
        channels = (in_channels, *CONV_WIDTHS)
        # The convolutions and the head draw their initial weights before the
        # norm under test draws its own, so with one seed every variant starts
        # from the same weights (BatchNorm's initialisation draws nothing).
        self.convs = nn.ModuleList(
            conv(c_in, c_out, KERNEL_SIZE, padding=KERNEL_SIZE // 2) for c_in, c_out in zip(channels, channels[1:])
        )
        self.head = nn.Linear(CONV_WIDTHS[-1], num_classes)
        self.norms = nn.ModuleList(
            norm_under_test(width) if slot == NORM_UNDER_TEST_SLOT else batch_norm(width)
            for slot, width in enumerate(CONV_WIDTHS)
        )
        self.pool = max_pool(3, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        last = len(self.convs) - 1
        for index, (conv, norm) in enumerate(zip(self.convs, self.norms)):
            x = F.relu(norm(conv(x)))
            if index < last:
                x = self.pool(x)
        return self.head(x.flatten(2).mean(2))


def norm_factory(variant: str, spatial_dims: int, num_components: int = 3, backend: str = "auto",
                 mn_em_every: int = 1) -> Callable[[int], nn.Module]:
    """A constructor ``channels -> normalisation layer`` for ``variant`` (a key of :data:`VARIANT_LABELS`)."""
    if variant == "bn":
        return nn.BatchNorm1d if spatial_dims == 1 else nn.BatchNorm2d
    if variant == "mn":
        return lambda channels: MixtureNorm(channels, num_components, em_every=mn_em_every, backend=backend)
    if variant == "uan_weight":
        return lambda channels: UAN(channels, num_components, update="weight", backend=backend)
    if variant == "uan_ma":
        return lambda channels: UAN(channels, num_components, update="moving_average", backend=backend)
    raise ValueError(f"unknown variant {variant!r}; expected one of {tuple(VARIANT_LABELS)}")


# ---------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------


@dataclass
class RunResult:
    """One training run, per epoch: mean training loss, test accuracy (fraction), and
    the wall time and this process's CPU time of the training pass (seconds,
    evaluation excluded). CPU time is the work done, whatever else the machine runs."""

    variant: str
    lr: float
    seed: int
    train_loss: List[float]
    test_accuracy: List[float]
    epoch_time_s: List[float]
    epoch_cpu_s: List[float]


@torch.no_grad()
def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    """Accuracy of ``model`` in eval mode (running statistics)."""
    model.eval()
    correct = sum(int((model(xb).argmax(1) == yb).sum()) for xb, yb in zip(x.split(EVAL_BATCH_SIZE),
                                                                             y.split(EVAL_BATCH_SIZE)))
    return correct / len(y)


def train_run(data: SplitData, variant: str, lr: float, seed: int, epochs: int, *, batch_size: int = 256,
              weight_decay: float = 1e-4, num_components: int = 3, backend: str = "auto", mn_em_every: int = 1,
              on_epoch: Optional[Callable[[int, float, float, float], None]] = None) -> RunResult:
    """Train one Shallow CNN on ``data`` (already on its device) and test it after every epoch.

    ``on_epoch(epoch, train_loss, test_accuracy, epoch_time_s)`` is called after each epoch.
    """
    torch.manual_seed(seed)
    norm = norm_factory(variant, data.spatial_dims, num_components, backend, mn_em_every)
    device = data.train_x.device
    model = ShallowCNN(data.train_x.shape[1], data.num_classes, norm, data.spatial_dims).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    # Its own generator, so that the batch order depends on the seed only, not on
    # how many random numbers the normalisation under test draws.
    shuffle = torch.Generator().manual_seed(seed)
    size = len(data.train_y)
    result = RunResult(variant, lr, seed, [], [], [], [])
    for epoch in range(1, epochs + 1):
        model.train()
        start, cpu_start = time.perf_counter(), time.process_time()
        loss_sum = torch.zeros((), device=device)
        for batch in torch.randperm(size, generator=shuffle).to(device).split(batch_size):
            loss = F.cross_entropy(model(data.train_x[batch]), data.train_y[batch])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            loss_sum += loss.detach() * len(batch)
        # .item() waits for queued GPU work, so the time covers the whole epoch.
        train_loss = loss_sum.item() / size
        epoch_time, epoch_cpu = time.perf_counter() - start, time.process_time() - cpu_start
        accuracy = evaluate(model, data.test_x, data.test_y)
        result.train_loss.append(train_loss)
        result.test_accuracy.append(accuracy)
        result.epoch_time_s.append(epoch_time)
        result.epoch_cpu_s.append(epoch_cpu)
        if on_epoch is not None:
            on_epoch(epoch, train_loss, accuracy, epoch_time)
    return result


class ProgressBar:
    """A one-line progress bar over every epoch of every run, on stderr.

    On a terminal it is redrawn in place after each epoch and left on screen
    when a run ends; in a log file only the line at the end of each run is written.
    """

    def __init__(self, total_epochs: int, stream: TextIO = sys.stderr, width: int = 24) -> None:
        self.total_epochs = total_epochs
        self.stream = stream
        self.width = width
        self.done = 0
        self.start = time.perf_counter()
        self.interactive = stream.isatty()
        self.last_length = 0

    @staticmethod
    def _clock(seconds: float) -> str:
        minutes, seconds = divmod(int(round(seconds)), 60)
        return f"{minutes:d}:{seconds:02d}"

    def _line(self, status: str) -> str:
        filled = self.width * self.done // self.total_epochs
        elapsed = time.perf_counter() - self.start
        remaining = elapsed / self.done * (self.total_epochs - self.done) if self.done else 0.0
        return (f"[{'#' * filled}{'.' * (self.width - filled)}] {self.done}/{self.total_epochs} epochs "
                f"{self._clock(elapsed)} elapsed, {self._clock(remaining)} left | {status}")

    def epoch_done(self, status: str) -> None:
        self.done += 1
        if self.interactive:
            line = self._line(status)
            self.stream.write("\r" + line.ljust(self.last_length))
            self.stream.flush()
            self.last_length = len(line)

    def run_done(self, status: str) -> None:
        line = self._line(status)
        self.stream.write(("\r" + line.ljust(self.last_length) if self.interactive else line) + "\n")
        self.stream.flush()
        self.last_length = 0


# ---------------------------------------------------------------------------
# The protocol and its outputs
# ---------------------------------------------------------------------------


def _package_version(name: str) -> Optional[str]:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def _git_commit() -> Optional[str]:
    """The checked-out commit of the repository holding this file, when there is one."""
    try:
        done = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).resolve().parent,
                              capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.strip() if done.returncode == 0 else None


def environment(device: torch.device) -> Dict[str, object]:
    """Versions and machine facts that the numbers depend on."""
    return {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "numpy": np.__version__,
        "uan_kernels": uan_kernels.__version__,
        "scikit-learn": _package_version("scikit-learn"),
        "mnist1d": _package_version("mnist1d"),
        "matplotlib": _package_version("matplotlib"),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "uan_backends_available": uan_kernels.available_backends(device),
        "git_commit": _git_commit(),
    }


def run_protocol(args: argparse.Namespace, stream: TextIO = sys.stderr) -> Dict[str, object]:
    """Every (learning rate, seed, variant) run of ``args``; the content of ``results.json``."""
    device = torch.device(args.device)
    data = load_dataset(args.dataset, args.data_dir).subset(args.max_train, args.max_test).to(device)
    epochs = args.epochs if args.epochs is not None else DEFAULT_EPOCHS[args.dataset]
    config = {
        "dataset": args.dataset,
        "data_dir": str(args.data_dir) if args.data_dir is not None else None,
        "train_size": len(data.train_y),
        "test_size": len(data.test_y),
        "input_shape": list(data.train_x.shape[1:]),
        "num_classes": data.num_classes,
        "epochs": epochs,
        "seeds": args.seeds,
        "lrs": args.lrs,
        "variants": args.variants,
        "batch_size": args.batch_size,
        "optimizer": "AdamW",
        "weight_decay": args.weight_decay,
        "num_components": args.num_components,
        "mn_em_every": args.mn_em_every,
        "backend": args.backend,
        "device": str(device),
        "threads": args.threads,
        "model": {"conv_widths": list(CONV_WIDTHS), "kernel_size": KERNEL_SIZE,
                  "norm_under_test_slot": NORM_UNDER_TEST_SLOT + 1, "spatial_dims": data.spatial_dims},
    }
    progress = ProgressBar(len(args.lrs) * len(args.seeds) * len(args.variants) * epochs, stream)
    previous_determinism = (torch.are_deterministic_algorithms_enabled(),
                            torch.is_deterministic_algorithms_warn_only_enabled())
    previous_threads = torch.get_num_threads()
    # Deterministic kernels cost nothing on CPU; on CUDA a few ops lack them, so only warn there.
    torch.use_deterministic_algorithms(True, warn_only=device.type != "cpu")
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    facts = environment(device)
    runs = []
    start = time.perf_counter()
    try:
        # Variants are interleaved within each (lr, seed), so that load from other
        # processes on a shared machine falls on every variant alike.
        for lr in args.lrs:
            for seed in args.seeds:
                for variant in args.variants:
                    label = f"{variant} lr={lr:g} seed={seed}"

                    def report(epoch, loss, accuracy, seconds, label=label):
                        progress.epoch_done(f"{label} epoch {epoch}: loss {loss:.4f}, "
                                            f"test acc {accuracy:.2%}, {seconds:.2f}s")

                    run = train_run(data, variant, lr, seed, epochs, batch_size=args.batch_size,
                                    weight_decay=args.weight_decay, num_components=args.num_components,
                                    backend=args.backend, mn_em_every=args.mn_em_every, on_epoch=report)
                    progress.run_done(f"{label}: final test acc {run.test_accuracy[-1]:.2%}, "
                                      f"median epoch {np.median(run.epoch_time_s):.2f}s")
                    runs.append(asdict(run))
    finally:
        torch.use_deterministic_algorithms(previous_determinism[0], warn_only=previous_determinism[1])
        torch.set_num_threads(previous_threads)
    return {
        "config": config,
        "environment": facts,
        "finished": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "total_time_s": time.perf_counter() - start,
        "runs": runs,
    }


def _mean_std(values: np.ndarray) -> Tuple[float, float]:
    """Mean and sample standard deviation (0 for a single value)."""
    return float(np.mean(values)), float(np.std(values, ddof=1)) if len(values) > 1 else 0.0


def group_runs(results: Dict[str, object]) -> Dict[Tuple[str, float], Dict[str, np.ndarray]]:
    """``(variant, lr) -> {"test_accuracy", "train_loss", "epoch_time_s", "epoch_cpu_s": (seeds, epochs)
    arrays}``, in the order of the configuration."""
    config = results["config"]
    series_keys = ("test_accuracy", "train_loss", "epoch_time_s", "epoch_cpu_s")
    groups = {(variant, lr): {key: [] for key in series_keys}
              for lr in config["lrs"] for variant in config["variants"]}
    for run in results["runs"]:
        for key, values in groups[(run["variant"], run["lr"])].items():
            values.append(run[key])
    return {group: {key: np.asarray(values, dtype=float) for key, values in series.items()}
            for group, series in groups.items()}


def early_epoch(epochs: int) -> int:
    """The epoch whose accuracy stands for training speed: a quarter of the way in."""
    return max(1, math.ceil(epochs / 4))


def summary_markdown(results: Dict[str, object]) -> str:
    """The summary table and the facts needed to read it."""
    config, env = results["config"], results["environment"]
    groups = group_runs(results)
    epochs = config["epochs"]
    early = early_epoch(epochs)

    def pct(values: np.ndarray) -> str:
        mean, std = _mean_std(100 * values)
        return f"{mean:.2f} ± {std:.2f}"

    lines = [
        f"# Shallow CNN on {config['dataset']}",
        "",
        f"{config['train_size']} train / {config['test_size']} test examples, input {config['input_shape']}, "
        f"{epochs} epochs, batch {config['batch_size']}, AdamW (weight decay {config['weight_decay']:g}), "
        f"K = {config['num_components']}, seeds {config['seeds']}; MixtureNorm refits by EM every "
        f"{config['mn_em_every']} step(s). Device: {env['device']} (torch threads: {env['torch_threads']}), "
        f"torch {env['torch']}, uan_kernels {env['uan_kernels']}, backend {config['backend']!r}. "
        f"Total run time {results['total_time_s'] / 60:.1f} min.",
        "",
        f"Accuracies are test accuracy in %, mean ± sample std over {len(config['seeds'])} seeds (one test "
        f"example is {100 / config['test_size']:.2f}%); \"epoch {early}\" is the accuracy a quarter of the way "
        "through training (speed of training). Epoch times are medians over all epochs and seeds of a training "
        "epoch (evaluation excluded): wall time, and this process's CPU time, which is the work done whatever "
        "else the machine runs; \"vs BN\" divides by BatchNorm's at the same learning rate.",
        "",
        f"| variant | lr | final acc | best acc | acc at epoch {early} | final train loss "
        "| epoch wall (s) | wall vs BN | epoch CPU (s) | CPU vs BN |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for (variant, lr), series in groups.items():
        accuracy = series["test_accuracy"]
        loss_mean, loss_std = _mean_std(series["train_loss"][:, -1])
        cells = [VARIANT_LABELS[variant], f"{lr:g}", pct(accuracy[:, -1]), pct(accuracy.max(1)),
                 pct(accuracy[:, early - 1]), f"{loss_mean:.4f} ± {loss_std:.4f}"]
        baseline = groups.get(("bn", lr))
        for key in ("epoch_time_s", "epoch_cpu_s"):
            seconds = float(np.median(series[key]))
            cells.append(f"{seconds:.3f}")
            cells.append(f"{seconds / float(np.median(baseline[key])):.2f}x" if baseline else "n/a")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot_curves(results: Dict[str, object], path: Path) -> None:
    """Test accuracy (top) and training loss (bottom, log scale) per epoch, one column
    per learning rate, mean over seeds with a +- one standard deviation band."""
    # The object-oriented API renders with Agg and needs no display or pyplot state.
    from matplotlib.figure import Figure

    config = results["config"]
    lrs = config["lrs"]
    figure = Figure(figsize=(5.5 * len(lrs), 8), layout="constrained")
    axes = figure.subplots(2, len(lrs), squeeze=False, sharex=True)
    for (variant, lr), series in group_runs(results).items():
        column = lrs.index(lr)
        for row, (key, scale) in enumerate((("test_accuracy", 100.0), ("train_loss", 1.0))):
            values = scale * series[key]
            mean = values.mean(0)
            std = values.std(0, ddof=1) if len(values) > 1 else np.zeros_like(mean)
            epochs = np.arange(1, len(mean) + 1)
            axis = axes[row, column]
            colour = VARIANT_COLOURS[variant]
            axis.plot(epochs, mean, color=colour, label=VARIANT_LABELS[variant])
            axis.fill_between(epochs, mean - std, mean + std, color=colour, alpha=0.2, linewidth=0)
    for column, lr in enumerate(lrs):
        axes[0, column].set_title(f"{config['dataset']}, lr = {lr:g} ({len(config['seeds'])} seeds, mean ± std)")
        axes[0, column].set_ylabel("test accuracy (%)")
        axes[1, column].set_ylabel("training loss")
        axes[1, column].set_yscale("log")
        axes[1, column].set_xlabel("epoch")
        for axis in axes[:, column]:
            axis.grid(alpha=0.3)
    axes[0, 0].legend(loc="lower right")
    figure.savefig(path, dpi=110)


def write_outputs(results: Dict[str, object], out: Path) -> None:
    """``results.json``, ``curves.png`` and ``summary.md`` in ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=1) + "\n")
    plot_curves(results, out / "curves.png")
    (out / "summary.md").write_text(summary_markdown(results))


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m experiments.shallow_cnn",
        description="Train the paper's Shallow CNN with BatchNorm, Mixture Normalization and UAN in its "
                    "second normalisation; write results.json, curves.png and summary.md.",
    )
    parser.add_argument("--dataset", choices=DATASETS, default="digits")
    parser.add_argument("--data-dir", type=Path, default=None,
                        help="cifar10/cifar100: folder of the python-pickle release (or its parent)")
    parser.add_argument("--epochs", type=int, default=None,
                        help="default: " + ", ".join(f"{k} {v}" for k, v in DEFAULT_EPOCHS.items()))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--lrs", type=float, nargs="+", default=[0.001, 0.005])
    parser.add_argument("--variants", nargs="+", choices=tuple(VARIANT_LABELS), default=list(VARIANT_LABELS))
    parser.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    parser.add_argument("--backend", default="auto", choices=uan_kernels.BACKEND_NAMES,
                        help="UAN/MixtureNorm kernels (default auto: the compiled extension)")
    parser.add_argument("--out", type=Path, default=None, help="default: experiments/results/<dataset>")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--weight-decay", type=float, default=1e-4, help="AdamW's (the authors' 1e-4)")
    parser.add_argument("--num-components", type=int, default=3, help="K for MixtureNorm and UAN")
    parser.add_argument("--mn-em-every", type=int, default=1,
                        help="MixtureNorm refits its mixture by EM every this many steps (default: every step)")
    parser.add_argument("--threads", type=int, default=None,
                        help="CPU threads for torch (default: torch's choice); on a machine shared with other "
                             "jobs, fewer threads than cores avoids threads waiting on each other")
    parser.add_argument("--max-train", type=int, default=None, help="use only the first N training examples")
    parser.add_argument("--max-test", type=int, default=None, help="use only the first N test examples")
    args = parser.parse_args(argv)
    for name in ("epochs", "threads", "batch_size", "num_components", "mn_em_every", "max_train", "max_test"):
        value = getattr(args, name)
        if value is not None and value < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1, got {value}")
    return args


def main(argv: Optional[Sequence[str]] = None) -> Dict[str, object]:
    """Run the protocol, write its outputs, print the summary table; returns the results."""
    args = parse_args(argv)
    out = args.out if args.out is not None else Path("experiments") / "results" / args.dataset
    results = run_protocol(args)
    write_outputs(results, out)
    print(summary_markdown(results))
    print(f"wrote {out / 'results.json'}, {out / 'curves.png'}, {out / 'summary.md'}")
    return results


if __name__ == "__main__":
    main()
