"""The benchmark table: every normalisation on this machine's device, in one run.

``python -m uan_kernels.bench`` (or the ``uan-bench`` console script) measures
the device's copy bandwidth, then for each implementation and pass (training
forward, forward+backward, eval) the median time, the bandwidth achieved on
the bytes the pass must move, its share of the copy bandwidth, the ratio to
BatchNorm2d and the speed-up over the reference under ``torch.compile``, plus
the bytes saved for backward and (on GPU) the peak memory. Implementations
are measured in paired rounds (:class:`PairedRounds`): every ratio is the
median of ratios taken within a round, under the same load, with its spread.
On a CPU the table is measured at the default torch thread count and at one
thread. MixtureNorm's EM is measured in its own paired rounds per fused
backend (:func:`measure_em`): one EM iteration against UAN's statistics pass,
the k-means++ seeding of a first fit, and MixtureNorm's training forward (EM
every step) against UAN's, on a subsample and on the full batch. Results go to
``benchmarks/results/<device>/`` as JSON, markdown and a PNG plot. The
pytest-benchmark suites in ``benchmarks/`` build their cases with the same
:func:`make_module` and :class:`PairedRounds`.
"""
from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import random
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Callable, Dict, List, Optional

import torch
from torch import nn

from . import MixtureNorm, UAN, _backends, available_backends, mixture_norm
from .functional import values_per_channel

# Passes over the tensor each pass must make (DESIGN.md): the training forward
# reads x twice and writes y; the backward reads x and dy twice and writes dx;
# eval reads x once and writes y.
PASSES = {"forward": 3, "forward+backward": 8, "eval": 2}
IMPLEMENTATIONS = (
    "batchnorm2d",
    "uan_cpp",
    "uan_triton",
    "uan_reference",
    "uan_reference_compiled",
    "mixturenorm_em1",
    "mixturenorm_em10",
    "mixturenorm_em1_full",
)
# MixtureNorm's implementations: "mixturenorm_em<every>", EM on em_samples=4096
# values per channel every <every> training steps; "_full": EM on the whole batch.
_FULL_BATCH_SUFFIX = "_full"
# Shapes: the paper's Shallow-CNN UAN input and a DenseNet-like one on GPU;
# scaled-down versions on CPU, where the eager reference is very slow.
SHAPES = {
    "cuda": {"shallow_cnn": (256, 128, 36, 36), "densenet": (64, 256, 16, 16)},
    "cpu": {"shallow_cnn_small": (32, 64, 32, 32), "densenet_small": (16, 128, 16, 16)},
}


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return platform.processor() or platform.machine()


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_time(fn: Callable[[], object], device: torch.device, repeats: int, warmup: int = 2) -> float:
    """Median wall time of ``fn`` in seconds, synchronising the device around each call.

    For absolute figures that have no counterpart to pair with (copy bandwidth,
    the EM fit alone); comparisons between implementations use :class:`PairedRounds`.
    """
    for _ in range(warmup):
        fn()
    synchronize(device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        synchronize(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def time_calls(fn: Callable[[], object], device: torch.device, calls: int = 1) -> float:
    """Seconds per call of ``fn`` over ``calls`` back-to-back calls (CUDA events on a GPU)."""
    synchronize(device)
    if device.type == "cuda":
        start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(calls):
            fn()
        stop.record()
        stop.synchronize()
        return start.elapsed_time(stop) / 1e3 / calls
    start_s = time.perf_counter()
    for _ in range(calls):
        fn()
    return (time.perf_counter() - start_s) / calls


@dataclass
class Spread:
    """Median, quartiles and extremes of a sample (quartiles by the inclusive method)."""

    median: float
    q1: float
    q3: float
    min: float
    max: float

    @classmethod
    def of(cls, values: List[float]) -> "Spread":
        q1, _, q3 = statistics.quantiles(values, n=4, method="inclusive") if len(values) > 1 else values * 3
        return cls(statistics.median(values), q1, q3, min(values), max(values))

    def scaled(self, factor: float) -> "Spread":
        return Spread(*(factor * v for v in (self.median, self.q1, self.q3, self.min, self.max)))


class PairedRounds:
    """Times several implementations of one pass under the same load.

    Each round runs every implementation once, in a freshly shuffled order, so
    that a load change on a shared machine hits all of them alike; ratios are
    taken within a round and summarised over rounds (median and spread), never
    between medians of separate runs. On a GPU each measurement is several
    back-to-back calls (about a millisecond in all) timed with CUDA events.
    """

    GPU_MEASUREMENT_S = 1e-3

    def __init__(self, functions: Dict[str, Callable[[], object]], device: torch.device, seed: int = 0):
        self.functions = functions
        self.device = device
        self.rng = random.Random(seed)
        self.times: Dict[str, List[float]] = {name: [] for name in functions}
        self.calls = {name: 1 for name in functions}

    def warm_up(self) -> None:
        """Runs each implementation twice (compilation, caches) and sizes its GPU measurement."""
        for name, fn in self.functions.items():
            fn()
            seconds = time_calls(fn, self.device)
            if self.device.type == "cuda":
                self.calls[name] = max(1, min(100, math.ceil(self.GPU_MEASUREMENT_S / max(seconds, 1e-7))))

    def round(self) -> None:
        order = list(self.functions)
        self.rng.shuffle(order)
        for name in order:
            self.times[name].append(time_calls(self.functions[name], self.device, self.calls[name]))

    def run(self, rounds: int) -> "PairedRounds":
        self.warm_up()
        for _ in range(rounds):
            self.round()
        return self

    def seconds(self, name: str) -> Spread:
        return Spread.of(self.times[name])

    def ratio(self, numerator: str, denominator: str) -> Optional[Spread]:
        """Per-round ``time(numerator) / time(denominator)``, summarised; None if either is missing."""
        if numerator not in self.times or denominator not in self.times:
            return None
        return Spread.of([a / b for a, b in zip(self.times[numerator], self.times[denominator])])


def copy_bandwidth(device: torch.device, nbytes: int = 256 * 2**20) -> float:
    """Device-to-device copy bandwidth in bytes/s (read + write counted)."""
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device).uniform_()
    dst = torch.empty_like(src)
    seconds = median_time(lambda: dst.copy_(src), device, repeats=10)
    return 2 * nbytes / seconds


def make_module(name: str, channels: int, components: int, device, dtype=torch.float32) -> nn.Module:
    """The normalisation layer ``name`` of the benchmark, in training mode.

    Parameters stay float32 for float16/bfloat16 input, as in mixed precision.
    """
    param_dtype = torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype
    kwargs = {"device": device, "dtype": param_dtype}
    if name == "batchnorm2d":
        return nn.BatchNorm2d(channels, **kwargs)
    if name.startswith("uan_"):
        backend = name[len("uan_"):].replace("_compiled", "")
        module = UAN(channels, components, backend=backend, **kwargs)
        return torch.compile(module) if name.endswith("_compiled") else module
    if name in IMPLEMENTATIONS and name.startswith("mixturenorm_em"):
        every = name[len("mixturenorm_em"):]
        full = every.endswith(_FULL_BATCH_SUFFIX)
        return MixtureNorm(channels, components, em_every=int(every[:-len(_FULL_BATCH_SUFFIX)] if full else every),
                           **({"em_samples": None} if full else {}), **kwargs)
    raise ValueError(f"unknown implementation {name!r}; expected one of {IMPLEMENTATIONS}")


def runnable(name: str, device: torch.device) -> Optional[str]:
    """None when ``name`` can be benchmarked on ``device``, else why not."""
    if name == "uan_cpp" and "cpp" not in available_backends(device):
        return "no compiled kernel for this device"
    if name == "uan_triton" and (device.type != "cuda" or "triton" not in available_backends(device)):
        return "Triton runs compiled kernels on GPUs only (the CPU interpreter is for testing)"
    return None


def pass_function(module: nn.Module, pass_name: str, x: torch.Tensor, grad_out: torch.Tensor):
    """A zero-argument callable that runs one pass of ``module`` on ``x``."""
    trainable = [p for p in module.parameters() if p.requires_grad]

    def forward():
        module.train()
        with torch.no_grad():
            return module(x)

    def forward_backward():
        module.train()
        out = module(x)
        return torch.autograd.grad(out, [x, *trainable], grad_out)

    def evaluate():
        module.eval()
        with torch.no_grad():
            return module(x)

    return {"forward": forward, "forward+backward": forward_backward, "eval": evaluate}[pass_name]


def saved_bytes(module: nn.Module, x: torch.Tensor) -> int:
    """Bytes of distinct storages autograd saves for backward in one training forward."""
    storages: Dict[int, int] = {}

    def pack(t):
        storage = t.untyped_storage()
        storages[storage.data_ptr()] = storage.nbytes()
        return t

    module.train()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        module(x)
    return sum(storages.values())


@dataclass
class Row:
    implementation: str
    shape: List[int]
    dtype: str
    components: int
    pass_name: str
    threads: int
    rounds: int
    median_ms: float
    ms: Spread
    gb_per_s: float
    copy_fraction: float
    vs_batchnorm: Optional[Spread] = None
    speedup_vs_compiled_reference: Optional[Spread] = None
    saved_for_backward_mb: Optional[float] = None
    peak_memory_mb: Optional[float] = None


@dataclass
class EmRow:
    """One operation of MixtureNorm's EM (or its UAN counterpart) and its paired ratios to UAN's passes."""

    backend: str
    shape: List[int]
    dtype: str
    components: int
    threads: int
    rounds: int
    operation: str
    ms: Spread
    vs_uan_statistics: Spread
    vs_uan_forward: Spread


@dataclass
class Report:
    device: str
    device_type: str
    torch: str
    triton: Optional[str]
    date: str
    copy_bandwidth_gb_per_s: float
    rounds: int
    thread_counts: List[int]
    rows: List[Row] = field(default_factory=list)
    em: List[EmRow] = field(default_factory=list)
    skipped: Dict[str, str] = field(default_factory=dict)


def progress(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _triton_version() -> Optional[str]:
    try:
        import triton
    except ImportError:
        return None
    return triton.__version__


def measure(
    device: torch.device,
    shapes: Dict[str, tuple],
    dtypes: List[torch.dtype],
    components: int,
    implementations: List[str],
    rounds: int,
    thread_counts: Optional[List[int]] = None,
) -> Report:
    """Paired measurement of every runnable implementation and pass, per shape, dtype and thread count."""
    thread_counts = thread_counts or [torch.get_num_threads()]
    bandwidth = copy_bandwidth(device)
    report = Report(
        device=device_name(device),
        device_type=device.type,
        torch=torch.__version__,
        triton=_triton_version(),
        date=datetime.date.today().isoformat(),
        copy_bandwidth_gb_per_s=bandwidth / 1e9,
        rounds=rounds,
        thread_counts=list(thread_counts),
    )
    progress(f"copy bandwidth on {report.device}: {report.copy_bandwidth_gb_per_s:.1f} GB/s")
    for name in implementations:
        why = runnable(name, device)
        if why:
            report.skipped[name] = why
    todo = [n for n in implementations if n not in report.skipped]
    default_threads = torch.get_num_threads()
    try:
        for threads in thread_counts:
            torch.set_num_threads(threads)
            for shape_name, shape in shapes.items():
                for dtype in dtypes:
                    _measure_case(report, device, f"{shape_name} {str(dtype)[6:]}", shape, dtype, components, todo,
                                  rounds, threads, bandwidth)
    finally:
        torch.set_num_threads(default_threads)
    return report


def _measure_case(report: Report, device: torch.device, case: str, shape: tuple, dtype: torch.dtype,
                  components: int, implementations: List[str], rounds: int, threads: int, bandwidth: float) -> None:
    g = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(shape, device=device, dtype=dtype, generator=g).requires_grad_()
    grad_out = torch.randn(shape, device=device, dtype=dtype, generator=g)
    tensor_bytes = x.numel() * x.element_size()
    # Each case recompiles the compiled reference (new module, shape, threads);
    # past torch.compile's recompile limit it would silently run eagerly.
    torch._dynamo.reset()
    modules = {name: make_module(name, shape[1], components, device, dtype) for name in implementations}
    for pass_name in PASSES:
        progress(f"[{case}, {threads} threads] {pass_name}: {rounds} paired rounds of {', '.join(modules)}")
        paired = PairedRounds({name: pass_function(module, pass_name, x, grad_out)
                               for name, module in modules.items()}, device).run(rounds)
        moved = PASSES[pass_name] * tensor_bytes
        for name, module in modules.items():
            seconds = paired.seconds(name)
            row = Row(name, list(shape), str(dtype)[6:], components, pass_name, threads, rounds,
                      seconds.median * 1e3, seconds.scaled(1e3),
                      moved / seconds.median / 1e9, moved / seconds.median / bandwidth,
                      vs_batchnorm=paired.ratio(name, "batchnorm2d"),
                      speedup_vs_compiled_reference=paired.ratio("uan_reference_compiled", name))
            if pass_name == "forward+backward":
                row.saved_for_backward_mb = saved_bytes(module, x) / 2**20
                if device.type == "cuda":
                    torch.cuda.reset_peak_memory_stats(device)
                    base = torch.cuda.memory_allocated(device)
                    pass_function(module, pass_name, x, grad_out)()
                    row.peak_memory_mb = (torch.cuda.max_memory_allocated(device) - base) / 2**20
            report.rows.append(row)
    if any(name.startswith("mixturenorm") for name in implementations):
        for backend in ("cpp", "triton"):
            if runnable(f"uan_{backend}", device) is None:
                progress(f"[{case}, {threads} threads] MixtureNorm EM on {backend}: {rounds} paired rounds")
                report.em.extend(measure_em(device, shape, dtype, components, backend, rounds, threads))


# MixtureNorm's EM operations measured by measure_em, in table order.
EM_OPERATIONS = (
    "uan_statistics",
    "uan_forward",
    "em_iteration_full",
    "em_iteration_4096",
    "seeding_full",
    "seeding_4096",
    "mixturenorm_forward_full",
    "mixturenorm_forward_4096",
)
EM_SAMPLES = 4096


def em_functions(device: torch.device, shape: tuple, dtype: torch.dtype, components: int,
                 backend: str) -> Dict[str, Callable[[], object]]:
    """Zero-argument callables of :data:`EM_OPERATIONS` on a random input of ``shape``.

    ``em_iteration_*``: one EM iteration (one statistics pass and the O(K*C)
    float64 updates) on the full batch or on a subsample of ``EM_SAMPLES``
    values per channel, from a fitted mixture; ``seeding_*``: the start of a
    first fit (greedy k-means++ seeds, hard assignment, its statistics);
    ``mixturenorm_forward_*``: MixtureNorm's training forward with EM (10
    iterations, warm-started) every step; ``uan_statistics``: UAN's
    statistics pass alone; ``uan_forward``: UAN's training forward.
    """
    g = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(shape, device=device, dtype=dtype, generator=g)
    param_dtype = torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype
    kwargs = {"device": device, "dtype": param_dtype}
    channels = shape[1]
    uan = UAN(channels, components, backend=backend, **kwargs).train()
    subsampled = MixtureNorm(channels, components, backend=backend, em_samples=EM_SAMPLES, **kwargs).train()
    full = MixtureNorm(channels, components, backend=backend, em_samples=None, **kwargs).train()
    # A fitted mixture, as EM iterates from after its first fit.
    full.fit_mixture(x)
    mixture = (full.mu, full.log_sigma, full.mix_logits)
    statistics = _backends.resolve(backend, device).module.statistics
    start = (full.mu.double(), torch.exp(2.0 * full.log_sigma.double()), torch.softmax(full.mix_logits.double(), 0))
    sample = mixture_norm._em_input(x, EM_SAMPLES)

    def no_grad(fn):
        # As MixtureNorm runs its EM.
        return torch.no_grad()(fn)

    def em_iteration(data):
        sums = statistics(data, *mixture)
        channel_var = mixture_norm._channel_variance_from_sums(sums, full.mu.double(), values_per_channel(data))
        floor = mixture_norm._variance_floor(channel_var)
        return no_grad(lambda: mixture_norm._fused_em(statistics, data, *start, floor, 1, param_dtype))

    def seeding(data):
        def first_fit_start():
            values = mixture_norm._channel_values(data)
            channel_var = values.var(1, unbiased=False)
            return mixture_norm._initial_fit(values, channel_var, mixture_norm._variance_floor(channel_var),
                                             components)
        return no_grad(first_fit_start)

    def training_forward(module):
        return no_grad(lambda: module(x))

    return {
        "uan_statistics": lambda: statistics(x, *mixture),
        "uan_forward": training_forward(uan),
        "em_iteration_full": em_iteration(x),
        "em_iteration_4096": em_iteration(sample),
        "seeding_full": seeding(x),
        "seeding_4096": seeding(sample),
        "mixturenorm_forward_full": training_forward(full),
        "mixturenorm_forward_4096": training_forward(subsampled),
    }


def measure_em(device: torch.device, shape: tuple, dtype: torch.dtype, components: int, backend: str,
               rounds: int, threads: int) -> List[EmRow]:
    """:func:`em_functions` on ``backend`` in paired rounds, with ratios to UAN's statistics pass and forward."""
    functions = em_functions(device, shape, dtype, components, backend)
    paired = PairedRounds(functions, device).run(rounds)
    return [
        EmRow(backend, list(shape), str(dtype)[6:], components, threads, rounds, name, paired.seconds(name).scaled(1e3),
              paired.ratio(name, "uan_statistics"), paired.ratio(name, "uan_forward"))
        for name in EM_OPERATIONS
    ]


def format_table(report: Report) -> str:
    """The report as a markdown table (one row per thread count, shape, dtype, pass and implementation)."""
    lines = [
        f"Device: {report.device} ({report.device_type}); torch {report.torch}; triton {report.triton}; "
        f"{report.date}; copy bandwidth {report.copy_bandwidth_gb_per_s:.1f} GB/s; K = "
        f"{report.rows[0].components if report.rows else '-'}; torch threads {report.thread_counts}",
        "",
        f"Paired: {report.rounds} rounds per case, each running every implementation once in a shuffled order. "
        "Times are medians over rounds; ratios are medians of the per-round ratios, with their interquartile "
        "range in brackets.",
        "",
        "| threads | shape | dtype | pass | implementation | median ms | GB/s | % copy BW | × BatchNorm2d "
        "| speed-up vs compiled ref | saved for bwd MB | peak MB |",
        "|---:|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]

    def fmt(value, spec):
        return "-" if value is None else format(value, spec)

    def ratio(spread: Optional[Spread]) -> str:
        return "-" if spread is None else f"{spread.median:.2f} [{spread.q1:.2f}–{spread.q3:.2f}]"

    for r in report.rows:
        lines.append(
            f"| {r.threads} | {tuple(r.shape)} | {r.dtype} | {r.pass_name} | {r.implementation} "
            f"| {r.median_ms:.3f} | {r.gb_per_s:.1f} | {100 * r.copy_fraction:.1f} | {ratio(r.vs_batchnorm)} "
            f"| {ratio(r.speedup_vs_compiled_reference)} | {fmt(r.saved_for_backward_mb, '.1f')} "
            f"| {fmt(r.peak_memory_mb, '.1f')} |"
        )
    if report.em:
        lines += [
            "",
            f"MixtureNorm's EM, paired with UAN's statistics pass and training forward ({report.em[0].rounds} rounds "
            "per case): one EM iteration (a statistics pass and O(K·C) float64 updates) from a fitted mixture, on "
            f"the full batch or on {EM_SAMPLES} values per channel; the seeding of a first fit (greedy k-means++, "
            "hard assignment); MixtureNorm's training forward with EM (10 iterations) every step. Ratios are medians "
            "of per-round ratios [interquartile range].",
            "",
            "| threads | shape | dtype | backend | operation | median ms | × UAN statistics pass "
            "| × UAN training forward |",
            "|---:|---|---|---|---|---:|---:|---:|",
        ]
        for r in report.em:
            lines.append(
                f"| {r.threads} | {tuple(r.shape)} | {r.dtype} | {r.backend} | {r.operation} | {r.ms.median:.3f} "
                f"| {ratio(r.vs_uan_statistics)} | {ratio(r.vs_uan_forward)} |"
            )
    for name, why in report.skipped.items():
        lines.append(f"\nNot measured: {name}: {why}.")
    return "\n".join(lines)


def plot(report: Report, path: str) -> None:
    """Bar chart of achieved GB/s per implementation, one panel per pass, copy bandwidth as a line
    (at the first thread count measured)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shapes = sorted({(tuple(r.shape), r.dtype) for r in report.rows})
    fig, axes = plt.subplots(1, len(PASSES), figsize=(6 * len(PASSES), 4.5), squeeze=False)
    for ax, pass_name in zip(axes[0], PASSES):
        rows = [r for r in report.rows if r.pass_name == pass_name and r.threads == report.thread_counts[0]]
        names = list(dict.fromkeys(r.implementation for r in rows))
        width = 0.8 / max(1, len(shapes))
        for i, (shape, dtype) in enumerate(shapes):
            values = [next((r.gb_per_s for r in rows if r.implementation == n and tuple(r.shape) == shape
                            and r.dtype == dtype), 0.0) for n in names]
            ax.bar([j + i * width for j in range(len(names))], values, width, label=f"{shape} {dtype}")
        ax.axhline(report.copy_bandwidth_gb_per_s, color="black", linestyle="--", label="copy bandwidth")
        ax.set_xticks([j + 0.4 - width / 2 for j in range(len(names))])
        ax.set_xticklabels(names, rotation=35, ha="right", fontsize=8)
        ax.set_yscale("log")
        ax.set_ylabel("GB/s on counted bytes")
        ax.set_title(pass_name)
    axes[0][0].legend(fontsize=7)
    fig.suptitle(f"UAN and baselines on {report.device} ({report.date})")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description="UAN benchmark table on this machine's device.")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--components", type=int, default=3)
    parser.add_argument("--dtypes", nargs="+", default=None, help="default: float32 (+ bfloat16 on GPU)")
    parser.add_argument("--implementations", nargs="+", default=list(IMPLEMENTATIONS), choices=IMPLEMENTATIONS)
    parser.add_argument("--rounds", type=int, default=None,
                        help="paired rounds per case (default: 30 on GPU, 10 on CPU)")
    parser.add_argument("--threads", type=int, nargs="+", default=None,
                        help="torch CPU thread counts to measure (default on CPU: the default count and 1)")
    parser.add_argument("--out", default=None, help="default: benchmarks/results/<device type>")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    dtypes = args.dtypes or (["float32", "bfloat16"] if device.type == "cuda" else ["float32"])
    rounds = args.rounds or (30 if device.type == "cuda" else 10)
    threads = args.threads or ([torch.get_num_threads()] if device.type == "cuda"
                               else sorted({torch.get_num_threads(), 1}, reverse=True))
    report = measure(device, SHAPES[device.type], [getattr(torch, d) for d in dtypes], args.components,
                     args.implementations, rounds, threads)
    out_dir = args.out or os.path.join("benchmarks", "results", device.type)
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "table.json"), "w") as f:
        json.dump(asdict(report), f, indent=2)
    table = format_table(report)
    with open(os.path.join(out_dir, "table.md"), "w") as f:
        f.write(table + "\n")
    plot(report, os.path.join(out_dir, "table.png"))
    print(table)
    print(f"\nwritten: {out_dir}/table.json, table.md, table.png")


if __name__ == "__main__":
    main()
