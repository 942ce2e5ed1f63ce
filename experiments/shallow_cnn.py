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

MULTIDOMAIN_SUFFIX = "-multidomain"
DATASETS = ("digits", "mnist1d", "cifar10", "cifar100", "digits" + MULTIDOMAIN_SUFFIX, "mnist1d" + MULTIDOMAIN_SUFFIX)
# Epochs of the default protocol per dataset: digits is sized to finish within
# ten minutes on two CPU cores, MNIST-1D within about a quarter of an hour;
# CIFAR uses the authors' 100 epochs. The multi-domain protocols train six
# variants instead of four and are sized to stay under a quarter of an hour.
DEFAULT_EPOCHS = {"digits": 12, "mnist1d": 15, "cifar10": 100, "cifar100": 100,
                  "digits" + MULTIDOMAIN_SUFFIX: 20, "mnist1d" + MULTIDOMAIN_SUFFIX: 10}

VARIANT_LABELS = {
    "bn": "BatchNorm",
    "mn": "MixtureNorm",
    "uan_weight": "UAN (weight)",
    "uan_ma": "UAN (moving average)",
    # K = D: one component per domain (multi-domain datasets only).
    "uan_weight_kD": "UAN (weight, K = D)",
    "uan_ma_kD": "UAN (moving average, K = D)",
}
# The variants run by default: the four of the single-domain protocol, plus the
# K = D variants where there are domains.
BASE_VARIANTS = ("bn", "mn", "uan_weight", "uan_ma")
PER_DOMAIN_K_VARIANTS = ("uan_weight_kD", "uan_ma_kD")
# Fixed colours, so that a variant looks the same in every panel and every run.
VARIANT_COLOURS = {"bn": "tab:blue", "mn": "tab:orange", "uan_weight": "tab:green", "uan_ma": "tab:red",
                   "uan_weight_kD": "tab:purple", "uan_ma_kD": "tab:brown"}

# Output channels of the four convolutions, as in the authors' Shallow CNN.
CONV_WIDTHS = (64, 128, 128, 256)
KERNEL_SIZE = 5
# Zero-based index of the normalisation under test: the second one, after conv2, as
# in the authors' Shallow CNN notebooks (and their figure of UAN's "conv2" layer).
# ``--norm-slot`` moves it, for instance to the first normalisation, which sees
# the input statistics most directly.
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
    """A fixed train/test split: float32 inputs ``(N, C, *S)`` and int64 labels ``(N,)``;
    for multi-domain data also each example's domain (int64 ``(N,)``, an index into
    ``domain_names``)."""

    name: str
    train_x: torch.Tensor
    train_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor
    num_classes: int
    train_domain: Optional[torch.Tensor] = None
    test_domain: Optional[torch.Tensor] = None
    domain_names: Optional[Tuple[str, ...]] = None

    @property
    def spatial_dims(self) -> int:
        return self.train_x.dim() - 2

    @property
    def num_domains(self) -> Optional[int]:
        """D, the number of domains; None for single-domain data."""
        return None if self.domain_names is None else len(self.domain_names)

    def subset(self, max_train: Optional[int], max_test: Optional[int]) -> "SplitData":
        """The first ``max_train`` / ``max_test`` examples (all when None), for quick runs."""
        def cut(t: Optional[torch.Tensor], n: Optional[int]) -> Optional[torch.Tensor]:
            return None if t is None else t[:n]

        return SplitData(self.name, self.train_x[:max_train], self.train_y[:max_train],
                         self.test_x[:max_test], self.test_y[:max_test], self.num_classes,
                         cut(self.train_domain, max_train), cut(self.test_domain, max_test), self.domain_names)

    def to(self, device: torch.device) -> "SplitData":
        def move(t: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
            return None if t is None else t.to(device)

        return SplitData(self.name, self.train_x.to(device), self.train_y.to(device),
                         self.test_x.to(device), self.test_y.to(device), self.num_classes,
                         move(self.train_domain), move(self.test_domain), self.domain_names)


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


@dataclass(frozen=True)
class Domain:
    """One input domain: ``x -> scale * x + offset + noise_std * N(0, 1)``, applied to
    inputs already standardised (zero mean, unit variance per channel)."""

    name: str
    scale: float
    offset: float
    noise_std: float

    def describe(self) -> str:
        parts = []
        if self.scale != 1.0:
            parts.append(f"x {self.scale:g}")
        if self.offset != 0.0:
            parts.append(f"{self.offset:+g}")
        if self.noise_std != 0.0:
            parts.append(f"+ N(0, {self.noise_std:g}^2) noise")
        return " ".join(parts) if parts else "unchanged"


# The D = 4 domains of the multi-domain datasets: the same signals seen through
# four "sensors" with very different input statistics.
DOMAINS = (
    Domain("identity", 1.0, 0.0, 0.0),
    Domain("contrast", 5.0, 5.0, 0.0),   # contrast x5 with an offset of 5 standard deviations
    Domain("inverted", -1.0, 0.0, 0.0),  # intensities inverted (sign flipped)
    Domain("noisy", 1.0, 0.0, 1.0),      # Gaussian noise as strong as the signal
)
# Seeds the domain assignment and the noise: every run sees the same examples
# in the same domains.
MULTIDOMAIN_SEED = 15


def balanced_domains(count: int, num_domains: int, rng: np.random.Generator) -> np.ndarray:
    """A seeded assignment of ``count`` examples to ``num_domains`` domains, as balanced
    as possible (the counts differ by at most one), in random order."""
    return rng.permutation(np.arange(count) % num_domains)


def make_multidomain(base: SplitData, domains: Sequence[Domain] = DOMAINS,
                     seed: int = MULTIDOMAIN_SEED) -> SplitData:
    """``base`` (standardised) with every example drawn through one of ``domains``.

    Each example of the training and of the test set gets one domain, assigned by
    a generator seeded with ``seed`` (balanced, fixed across runs), and fixed noise
    where its domain adds noise; train and test share the domains. The result is
    standardised again with the multi-domain training set's statistics, so the
    input is zero-mean and unit-variance overall while every domain keeps its own
    mean and scale.
    """
    rng = np.random.default_rng(seed)
    scale = torch.tensor([d.scale for d in domains], dtype=torch.float32)
    offset = torch.tensor([d.offset for d in domains], dtype=torch.float32)
    noise_std = torch.tensor([d.noise_std for d in domains], dtype=torch.float32)
    train_domain = torch.from_numpy(balanced_domains(len(base.train_y), len(domains), rng)).long()
    test_domain = torch.from_numpy(balanced_domains(len(base.test_y), len(domains), rng)).long()

    def transform(x: torch.Tensor, domain: torch.Tensor) -> torch.Tensor:
        noise = torch.from_numpy(rng.standard_normal(tuple(x.shape), dtype=np.float32))
        shape = (-1,) + (1,) * (x.dim() - 1)
        return (scale[domain].reshape(shape) * x + offset[domain].reshape(shape)
                + noise_std[domain].reshape(shape) * noise)

    train_x = transform(base.train_x, train_domain)
    test_x = transform(base.test_x, test_domain)
    split = standardised_split(base.name + MULTIDOMAIN_SUFFIX, train_x, base.train_y, test_x, base.test_y,
                               base.num_classes)
    split.train_domain, split.test_domain = train_domain, test_domain
    split.domain_names = tuple(d.name for d in domains)
    return split


def load_dataset(name: str, data_dir: Optional[os.PathLike] = None) -> SplitData:
    """The fixed split of dataset ``name`` (one of :data:`DATASETS`)."""
    if name.endswith(MULTIDOMAIN_SUFFIX) and name in DATASETS:
        return make_multidomain(load_dataset(name[:-len(MULTIDOMAIN_SUFFIX)], data_dir))
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
    ``norms[norm_slot]`` (zero-based; default :data:`NORM_UNDER_TEST_SLOT`) is
    ``norm_under_test(channels)``, the others are BatchNorm.
    """

    def __init__(self, in_channels: int, num_classes: int, norm_under_test: Callable[[int], nn.Module],
                 spatial_dims: int = 2, norm_slot: int = NORM_UNDER_TEST_SLOT) -> None:
        super().__init__()
        if not 0 <= norm_slot < len(CONV_WIDTHS):
            raise ValueError(f"norm_slot must be in [0, {len(CONV_WIDTHS)}), got {norm_slot}")
        self.norm_slot = norm_slot
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
            norm_under_test(width) if slot == norm_slot else batch_norm(width)
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
                 mn_em_every: int = 1, num_domains: Optional[int] = None) -> Callable[[int], nn.Module]:
    """A constructor ``channels -> normalisation layer`` for ``variant`` (a key of :data:`VARIANT_LABELS`).

    The ``*_kD`` variants use ``num_domains`` components instead of ``num_components``.
    """
    if variant in PER_DOMAIN_K_VARIANTS:
        if num_domains is None:
            raise ValueError(f"variant {variant!r} has K = D components and needs a multi-domain dataset")
        variant, num_components = variant[:-len("_kD")], num_domains
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
    # Multi-domain data only: per epoch, the test accuracy of each domain's examples;
    # after training, the responsibilities of the layer under test (when it is a
    # mixture) averaged per domain over the test examples, (D, K) rows summing to 1.
    test_accuracy_per_domain: Optional[List[List[float]]] = None
    tau_per_domain: Optional[List[List[float]]] = None
    # The same per channel, reduced to one number: the mean over channels of each
    # channel's domain-component information (see domain_component_information).
    domain_info_per_channel: Optional[float] = None


@torch.no_grad()
def predict(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Predicted classes of ``model`` in eval mode (running statistics)."""
    model.eval()
    return torch.cat([model(xb).argmax(1) for xb in x.split(EVAL_BATCH_SIZE)])


@torch.no_grad()
def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    """Accuracy of ``model`` in eval mode (running statistics)."""
    return int((predict(model, x) == y).sum()) / len(y)


def accuracy_per_domain(correct: torch.Tensor, domain: torch.Tensor, num_domains: int) -> List[float]:
    """The fraction of ``correct`` (bool per example) in each domain (NaN for an empty domain)."""
    hits = torch.bincount(domain, weights=correct.double(), minlength=num_domains)
    counts = torch.bincount(domain, minlength=num_domains).double()
    return (hits / counts).tolist()


def is_mixture(layer: nn.Module) -> bool:
    """Whether ``layer`` has per-element responsibilities (UAN, MixtureNorm)."""
    return all(hasattr(layer, name) for name in ("mu", "log_sigma", "mix_logits"))


@torch.no_grad()
def responsibilities_per_domain(model: "ShallowCNN", x: torch.Tensor, domain: torch.Tensor,
                                num_domains: int) -> torch.Tensor:
    """The responsibilities tau of the normalisation under test, averaged per domain
    and channel: a float64 ``(D, C, K)`` tensor whose rows ``[d, c, :]`` sum to 1.

    A forward pre-hook captures the layer's input for every example of ``x`` (in eval
    mode); tau is computed from the layer's current ``mu``, ``log_sigma`` and
    ``mix_logits`` (``uan_kernels.reference.responsibilities``, SPEC), averaged over
    the elements of each example and channel, then over the examples of each domain.
    The mean over channels is the ``(D, K)`` table of :class:`RunResult`.
    """
    from uan_kernels import reference

    layer = model.norms[model.norm_slot]
    if not is_mixture(layer):
        raise ValueError(f"the normalisation under test is a {type(layer).__name__}, not a mixture")
    per_example = []

    def capture(module, inputs):
        tau = reference.responsibilities(inputs[0].float(), layer.mu.float(), layer.log_sigma.float(),
                                         layer.mix_logits.float())
        per_example.append(tau.flatten(3).mean(3).permute(1, 2, 0).double())  # (K, N, C, *S) -> (N, C, K)

    handle = layer.register_forward_pre_hook(capture)
    try:
        predict(model, x)
    finally:
        handle.remove()
    tau = torch.cat(per_example)
    counts = torch.bincount(domain, minlength=num_domains).double()
    sums = torch.zeros(num_domains, *tau.shape[1:], dtype=torch.float64, device=tau.device)
    sums.index_add_(0, domain, tau)
    return (sums / counts[:, None, None]).cpu()


def domain_component_information(tau_per_domain: Sequence[Sequence[float]],
                                 domain_counts: Sequence[int]) -> float:
    """How much of the domain the components tell, from a ``(D, K)`` table of mean
    responsibilities: the mutual information between an element's domain and its
    component (the joint ``P(d, k) = P(d) * tau[d][k]``), divided by the entropy of
    the domain. 0 when every domain has the same mean responsibilities, 1 when each
    domain's elements go to components of their own (possible only with K >= D).
    The score does not depend on the order of the components, so it can be
    averaged over seeds, where the tables themselves cannot."""
    tau = np.asarray(tau_per_domain, dtype=float)
    p_domain = np.asarray(domain_counts, dtype=float)
    p_domain = p_domain / p_domain.sum()
    joint = p_domain[:, None] * tau
    p_component = joint.sum(0)
    with np.errstate(divide="ignore", invalid="ignore"):
        terms = np.where(joint > 0, joint * np.log(joint / (p_domain[:, None] * p_component[None, :])), 0.0)
    entropy = -float(np.sum(np.where(p_domain > 0, p_domain * np.log(p_domain), 0.0)))
    return float(terms.sum()) / entropy if entropy > 0 else 0.0


def train_run(data: SplitData, variant: str, lr: float, seed: int, epochs: int, *, batch_size: int = 256,
              weight_decay: float = 1e-4, num_components: int = 3, backend: str = "auto", mn_em_every: int = 1,
              norm_slot: int = NORM_UNDER_TEST_SLOT,
              on_epoch: Optional[Callable[[int, float, float, float], None]] = None) -> RunResult:
    """Train one Shallow CNN on ``data`` (already on its device) and test it after every epoch.

    ``on_epoch(epoch, train_loss, test_accuracy, epoch_time_s)`` is called after each epoch.
    """
    torch.manual_seed(seed)
    norm = norm_factory(variant, data.spatial_dims, num_components, backend, mn_em_every, data.num_domains)
    device = data.train_x.device
    model = ShallowCNN(data.train_x.shape[1], data.num_classes, norm, data.spatial_dims, norm_slot).to(device)
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
        correct = predict(model, data.test_x) == data.test_y
        accuracy = int(correct.sum()) / len(correct)
        if data.num_domains is not None:
            if result.test_accuracy_per_domain is None:
                result.test_accuracy_per_domain = []
            result.test_accuracy_per_domain.append(accuracy_per_domain(correct, data.test_domain, data.num_domains))
        result.train_loss.append(train_loss)
        result.test_accuracy.append(accuracy)
        result.epoch_time_s.append(epoch_time)
        result.epoch_cpu_s.append(epoch_cpu)
        if on_epoch is not None:
            on_epoch(epoch, train_loss, accuracy, epoch_time)
    if data.num_domains is not None and is_mixture(model.norms[model.norm_slot]):
        tau = responsibilities_per_domain(model, data.test_x, data.test_domain, data.num_domains)
        counts = torch.bincount(data.test_domain.cpu(), minlength=data.num_domains).tolist()
        result.tau_per_domain = tau.mean(1).tolist()
        result.domain_info_per_channel = float(np.mean(
            [domain_component_information(tau[:, c].numpy(), counts) for c in range(tau.shape[1])]))
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
                  "norm_under_test_slot": args.norm_slot, "spatial_dims": data.spatial_dims},
    }
    if data.num_domains is not None:
        config["domains"] = {
            "names": list(data.domain_names),
            "transforms": {d.name: d.describe() for d in DOMAINS},
            "seed": MULTIDOMAIN_SEED,
            "train_counts": torch.bincount(data.train_domain.cpu(), minlength=data.num_domains).tolist(),
            "test_counts": torch.bincount(data.test_domain.cpu(), minlength=data.num_domains).tolist(),
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
                                    backend=args.backend, mn_em_every=args.mn_em_every,
                                    norm_slot=args.norm_slot - 1, on_epoch=report)
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
    arrays}``, in the order of the configuration; multi-domain results add
    ``"test_accuracy_per_domain"``, ``(seeds, epochs, D)``. Runs are in the order of
    ``config["seeds"]``."""
    config = results["config"]
    series_keys = ["test_accuracy", "train_loss", "epoch_time_s", "epoch_cpu_s"]
    if "domains" in config:
        series_keys.append("test_accuracy_per_domain")
    groups = {(variant, lr): {key: [] for key in series_keys}
              for lr in config["lrs"] for variant in config["variants"]}
    for run in sorted(results["runs"], key=lambda run: config["seeds"].index(run["seed"])):
        for key, values in groups[(run["variant"], run["lr"])].items():
            values.append(run[key])
    return {group: {key: np.asarray(values, dtype=float) for key, values in series.items()}
            for group, series in groups.items()}


def variant_label(variant: str, config: Dict[str, object]) -> str:
    """The variant's name in tables and legends, with D spelled out for the K = D variants."""
    label = VARIANT_LABELS[variant]
    if variant in PER_DOMAIN_K_VARIANTS and "domains" in config:
        label = label.replace("K = D", f"K = D = {len(config['domains']['names'])}")
    return label


def _signed(values: np.ndarray) -> str:
    return ", ".join(f"{v:+.2f}" for v in values)


def paired_differences_markdown(results: Dict[str, object], groups) -> List[str]:
    """Per seed, each variant's final test accuracy minus BatchNorm's and minus
    MixtureNorm's (same seed and learning rate: same starting weights and batches),
    and the training CPU time per run."""
    config = results["config"]
    seeds = config["seeds"]
    lines = [
        "## Paired differences",
        "",
        f"Final test accuracy minus that of BatchNorm (and of MixtureNorm) with the same seed and learning rate, "
        f"in percentage points, per seed ({', '.join(map(str, seeds))}), then mean ± sample std of the "
        "differences. \"train CPU per run\" is the mean over seeds of the summed CPU time of the training "
        "epochs (evaluation excluded).",
        "",
        "| variant | lr | − BN per seed | − BN mean ± std | − MN per seed | − MN mean ± std | train CPU per run (s) |",
        "|---|---|---|---|---|---|---|",
    ]
    for (variant, lr), series in groups.items():
        final = 100 * series["test_accuracy"][:, -1]
        cells = [variant_label(variant, config), f"{lr:g}"]
        for reference in ("bn", "mn"):
            other = groups.get((reference, lr))
            if reference == variant or other is None or len(other["test_accuracy"]) != len(final):
                cells += ["", ""]
                continue
            difference = final - 100 * other["test_accuracy"][:, -1]
            mean, std = _mean_std(difference)
            cells += [_signed(difference), f"{mean:+.2f} ± {std:.2f}"]
        cells.append(f"{float(np.mean(series['epoch_cpu_s'].sum(1))):.1f}")
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def per_domain_markdown(results: Dict[str, object], groups) -> List[str]:
    """Final test accuracy per domain, mean ± std over seeds."""
    config = results["config"]
    domains = config["domains"]
    names = domains["names"]
    lines = [
        "## Test accuracy per domain",
        "",
        "Final test accuracy on each domain's test examples, in %, mean ± sample std over seeds. Domains: "
        + "; ".join(f"{name} ({domains['transforms'][name]}, {count} test examples)"
                    for name, count in zip(names, domains["test_counts"])) + ".",
        "",
        "| variant | lr | overall | " + " | ".join(names) + " |",
        "|---|---|---|" + "---|" * len(names),
    ]
    for (variant, lr), series in groups.items():
        overall = _mean_std(100 * series["test_accuracy"][:, -1])
        cells = [variant_label(variant, config), f"{lr:g}", f"{overall[0]:.2f} ± {overall[1]:.2f}"]
        for index in range(len(names)):
            mean, std = _mean_std(100 * series["test_accuracy_per_domain"][:, -1, index])
            cells.append(f"{mean:.2f} ± {std:.2f}")
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def responsibilities_markdown(results: Dict[str, object]) -> List[str]:
    """The responsibilities of the layer under test per domain: the domain-component
    information over seeds, and the first seed's (D, K) table per variant and learning rate."""
    config = results["config"]
    domains = config["domains"]
    names, counts = domains["names"], domains["test_counts"]
    runs = [run for run in results["runs"] if run.get("tau_per_domain") is not None]
    if not runs:
        return []
    first_seed = config["seeds"][0]
    lines = [
        "## Responsibilities per domain",
        "",
        f"After training, the responsibilities tau of the normalisation under test (slot "
        f"{config['model']['norm_under_test_slot']}) on the test examples, in eval mode, averaged over the "
        "elements and channels of each example, then over the examples of each domain: one row per domain, "
        "one column per component, rows sum to 1. \"domain info\" is the mutual information between an "
        "element's domain and its component divided by the domain's entropy (0: every domain has the same "
        "responsibilities; 1: each domain has components of its own, possible only with K ≥ D); it does not "
        "depend on the order of the components, so it is averaged over seeds (mean ± sample std), while the "
        f"tables are for seed {first_seed}. The table averages over channels, and component k of one channel "
        "need not be component k of another (only the mixing weights are shared), so \"per channel\" also "
        "gives the same score computed for each channel's own table, then averaged over channels.",
        "",
        "| variant | lr | domain info per seed | mean ± std | per channel, per seed | per channel, mean ± std |",
        "|---|---|---|---|---|---|",
    ]
    tables = []
    for lr in config["lrs"]:
        for variant in config["variants"]:
            group = [run for run in runs if run["variant"] == variant and run["lr"] == lr]
            if not group:
                continue
            group.sort(key=lambda run: config["seeds"].index(run["seed"]))
            scores = np.asarray([domain_component_information(run["tau_per_domain"], counts) for run in group])
            mean, std = _mean_std(scores)
            label = variant_label(variant, config)
            cells = [label, f"{lr:g}", ", ".join(f"{v:.3f}" for v in scores), f"{mean:.3f} ± {std:.3f}"]
            per_channel = [run.get("domain_info_per_channel") for run in group]
            if all(v is not None for v in per_channel):
                channel_mean, channel_std = _mean_std(np.asarray(per_channel))
                cells += [", ".join(f"{v:.3f}" for v in per_channel), f"{channel_mean:.3f} ± {channel_std:.3f}"]
            else:
                cells += ["", ""]
            lines.append("| " + " | ".join(cells) + " |")
            first = next((run for run in group if run["seed"] == first_seed), None)
            if first is not None:
                tau = first["tau_per_domain"]
                tables += ["", f"{label}, lr {lr:g}, seed {first_seed}:", "",
                           "| domain | " + " | ".join(f"k = {k}" for k in range(len(tau[0]))) + " |",
                           "|---|" + "---|" * len(tau[0])]
                tables += [f"| {name} | " + " | ".join(f"{v:.3f}" for v in row) + " |"
                           for name, row in zip(names, tau)]
    return lines + tables


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
        f"K = {config['num_components']}, seeds {config['seeds']}; the normalisation under test is number "
        f"{config['model']['norm_under_test_slot']} of {len(config['model']['conv_widths'])}, the others "
        f"BatchNorm; MixtureNorm refits by EM every "
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
        cells = [variant_label(variant, config), f"{lr:g}", pct(accuracy[:, -1]), pct(accuracy.max(1)),
                 pct(accuracy[:, early - 1]), f"{loss_mean:.4f} ± {loss_std:.4f}"]
        baseline = groups.get(("bn", lr))
        for key in ("epoch_time_s", "epoch_cpu_s"):
            seconds = float(np.median(series[key]))
            cells.append(f"{seconds:.3f}")
            cells.append(f"{seconds / float(np.median(baseline[key])):.2f}x" if baseline else "n/a")
        lines.append("| " + " | ".join(cells) + " |")
    if "domains" in config:
        lines += [""] + per_domain_markdown(results, groups)
    lines += [""] + paired_differences_markdown(results, groups)
    if "domains" in config:
        tau_lines = responsibilities_markdown(results)
        if tau_lines:
            lines += [""] + tau_lines
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
            axis.plot(epochs, mean, color=colour, label=variant_label(variant, config))
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


def plot_responsibilities(results: Dict[str, object], path: Path) -> bool:
    """Heat maps of the per-domain responsibilities of the first seed: one row per
    mixture variant, one column per learning rate. False (nothing written) when no
    run has them."""
    from matplotlib.figure import Figure

    config = results["config"]
    first_seed = config["seeds"][0]
    runs = {(run["variant"], run["lr"]): run for run in results["runs"]
            if run.get("tau_per_domain") is not None and run["seed"] == first_seed}
    variants = [variant for variant in config["variants"] if any((variant, lr) in runs for lr in config["lrs"])]
    if not variants:
        return False
    names = config["domains"]["names"]
    lrs = config["lrs"]
    figure = Figure(figsize=(max(6.5, 3.4 * len(lrs) + 1), 2.4 * len(variants) + 0.4), layout="constrained")
    axes = figure.subplots(len(variants), len(lrs), squeeze=False)
    image = None
    for row, variant in enumerate(variants):
        for column, lr in enumerate(lrs):
            axis = axes[row, column]
            run = runs.get((variant, lr))
            if run is None:
                axis.set_axis_off()
                continue
            tau = np.asarray(run["tau_per_domain"])
            image = axis.imshow(tau, vmin=0.0, vmax=1.0, cmap="viridis", aspect="auto")
            for (d, k), value in np.ndenumerate(tau):
                axis.text(k, d, f"{value:.2f}", ha="center", va="center", fontsize=8,
                          color="black" if value > 0.6 else "white")
            axis.set_xticks(range(tau.shape[1]), [f"k={k}" for k in range(tau.shape[1])])
            axis.set_yticks(range(len(names)), names)
            axis.set_title(f"{variant_label(variant, config)}, lr {lr:g}", fontsize=9)
    figure.suptitle(f"{config['dataset']}: mean responsibilities per test domain (seed {first_seed})",
                    fontsize=10)
    if image is not None:
        figure.colorbar(image, ax=axes, shrink=0.6, label="mean tau")
    figure.savefig(path, dpi=110)
    return True


def write_outputs(results: Dict[str, object], out: Path) -> None:
    """``results.json``, ``curves.png`` and ``summary.md`` in ``out``, and for
    multi-domain data ``responsibilities.png``."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=1) + "\n")
    plot_curves(results, out / "curves.png")
    if "domains" in results["config"]:
        plot_responsibilities(results, out / "responsibilities.png")
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
    parser.add_argument("--variants", nargs="+", choices=tuple(VARIANT_LABELS), default=None,
                        help="default: " + " ".join(BASE_VARIANTS) + ", plus " + " ".join(PER_DOMAIN_K_VARIANTS)
                             + " (K = number of domains) on the multi-domain datasets")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    parser.add_argument("--backend", default="auto", choices=uan_kernels.BACKEND_NAMES,
                        help="UAN/MixtureNorm kernels (default auto: the compiled extension)")
    parser.add_argument("--out", type=Path, default=None, help="default: experiments/results/<dataset>")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--weight-decay", type=float, default=1e-4, help="AdamW's (the authors' 1e-4)")
    parser.add_argument("--num-components", type=int, default=3, help="K for MixtureNorm and UAN")
    parser.add_argument("--mn-em-every", type=int, default=1,
                        help="MixtureNorm refits its mixture by EM every this many steps (default: every step)")
    parser.add_argument("--norm-slot", type=int, default=NORM_UNDER_TEST_SLOT + 1,
                        choices=range(1, len(CONV_WIDTHS) + 1), metavar="{1,2,3,4}",
                        help="which of the four normalisations is the one under test (default 2, the authors' "
                             "choice); the others are BatchNorm")
    parser.add_argument("--threads", type=int, default=None,
                        help="CPU threads for torch (default: torch's choice); on a machine shared with other "
                             "jobs, fewer threads than cores avoids threads waiting on each other")
    parser.add_argument("--max-train", type=int, default=None, help="use only the first N training examples")
    parser.add_argument("--max-test", type=int, default=None, help="use only the first N test examples")
    args = parser.parse_args(argv)
    multidomain = args.dataset.endswith(MULTIDOMAIN_SUFFIX)
    if args.variants is None:
        args.variants = list(BASE_VARIANTS) + (list(PER_DOMAIN_K_VARIANTS) if multidomain else [])
    elif not multidomain and any(v in PER_DOMAIN_K_VARIANTS for v in args.variants):
        parser.error(f"{' and '.join(PER_DOMAIN_K_VARIANTS)} need a multi-domain dataset (K = D)")
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
    written = [out / name for name in ("results.json", "curves.png", "responsibilities.png", "summary.md")
               if (out / name).exists()]
    print("wrote " + ", ".join(map(str, written)))
    return results


if __name__ == "__main__":
    main()
