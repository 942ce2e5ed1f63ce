"""Launches per training step and per eval forward of a UAN layer, counted on CPU tensors.

On a GPU every ATen op that does work is at least one kernel launch (~5 us
each, DESIGN.md), so the op count of the host code between the fused passes
matters as much as the passes themselves. This module counts, with
``torch.profiler`` on small CPU tensors:

* ``aten_ops``: leaf ATen ops that do work (an op with no ATen op beneath it,
  leaving out views, allocations and no-op conversions, which launch nothing);
* ``fused_ops``: calls of the project's fused operators (``uan::*``);
* ``triton_kernels``: launches of the Triton kernels (the ``"triton"``
  backend). They are intercepted and not run, so only the host code executes.

The kernels a CUDA build runs inside ``uan::forward``/``uan::backward`` are
not visible on CPU; :mod:`census` adds them from its CUDA pass table.

Triton's host code runs CPU tensors only under its interpreter, which must be
chosen before ``uan_kernels`` is imported: run this file as a script (it
prints the counts as JSON) or import it in a process with
``TRITON_INTERPRET=1``, as the tests do.
"""
from __future__ import annotations

import contextlib
import json
import os
import sys
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Dict, Iterator

if __name__ == "__main__":
    os.environ.setdefault("TRITON_INTERPRET", "1")
    # The counts describe this checkout's package, not another installed copy.
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from torch.profiler import ProfilerActivity, profile  # noqa: E402

PHASES = ("train weight", "train moving_average", "eval weight", "eval moving_average")
BACKENDS = ("cpp", "triton")
# Small enough that the CPU element passes use one chunk and allocate nothing
# (their allocations are not host code and have no CUDA counterpart).
_SHAPE = (2, 4, 3, 3)
_COMPONENTS = 3

# ATen ops that launch no kernel when they are leaves of the op tree: views,
# allocations, and conversions or copies that found nothing to do (those that
# do work show the copy as a child op).
NO_KERNEL_OPS = frozenset(
    "aten::" + name
    for name in (
        "empty", "empty_like", "empty_strided", "new_empty", "new_empty_strided", "view", "_unsafe_view",
        "view_as", "as_strided", "reshape", "_reshape_alias", "unsqueeze", "squeeze", "expand", "expand_as",
        "narrow", "slice", "select", "permute", "transpose", "t", "alias", "detach", "detach_", "lift_fresh",
        "to", "contiguous", "resize_", "unbind", "split", "split_with_sizes", "chunk",
        "result_type", "set_", "is_same_size", "_has_compatible_shallow_copy_type",
    )
)


@dataclass
class LaunchCount:
    """Launches of one phase; the ``*_by_name`` maps say which."""

    aten_ops: int = 0
    fused_ops: int = 0
    triton_kernels: int = 0
    aten_by_name: Dict[str, int] = field(default_factory=dict)
    fused_by_name: Dict[str, int] = field(default_factory=dict)
    triton_by_name: Dict[str, int] = field(default_factory=dict)


@contextlib.contextmanager
def intercepted_launches(module, handler: Callable) -> Iterator[None]:
    """Route every ``kernel[grid](...)`` launch of the Triton kernels in ``module`` to ``handler``.

    ``handler(kernel, *args, grid=..., warmup=..., **kwargs)`` gets the launch
    as Triton's ``run`` would. ``kernel[grid]`` calls ``kernel.run`` for both
    compiled and interpreted kernels, so an instance attribute replaces it.
    """
    import triton.runtime.jit

    kernels = [k for k in vars(module).values() if isinstance(k, triton.runtime.jit.KernelInterface)]
    for kernel in kernels:
        kernel.run = lambda *args, _kernel=kernel, **kwargs: handler(_kernel, *args, **kwargs)
    try:
        yield
    finally:
        for kernel in kernels:
            del kernel.run


def _kernel_name(kernel) -> str:
    return kernel.fn.__name__


def _count_events(events) -> LaunchCount:
    aten, fused = Counter(), Counter()
    for event in events:
        name = event.name
        if name.startswith("uan::"):
            # custom_op records the operator once per dispatch level; count the outermost.
            parent = event.cpu_parent
            while parent is not None and parent.name != name:
                parent = parent.cpu_parent
            if parent is None:
                fused[name] += 1
        elif name.startswith("aten::") and name not in NO_KERNEL_OPS:
            if not any(child.name.startswith("aten::") for child in event.cpu_children):
                aten[name] += 1
    return LaunchCount(
        aten_ops=sum(aten.values()),
        fused_ops=sum(fused.values()),
        aten_by_name=dict(sorted(aten.items())),
        fused_by_name=dict(sorted(fused.items())),
    )


def _step(layer: torch.nn.Module, x: torch.Tensor, grad: torch.Tensor, training: bool) -> None:
    if training:
        layer(x).backward(grad)
    else:
        with torch.no_grad():
            layer(x)


def count_phase(backend: str, phase: str) -> LaunchCount:
    """Launches of one training step (forward + backward) or eval forward of a UAN layer.

    ``phase`` is one of :data:`PHASES`. The step is run once unprofiled (lazy
    set-up, first-call work) and then once under the profiler, with the
    parameter gradients cleared as an optimizer's ``zero_grad`` leaves them.
    """
    import uan_kernels
    from uan_kernels.triton import kernels as triton_kernels

    mode, update = phase.split(" ")
    training = mode == "train"
    torch.manual_seed(0)
    layer = uan_kernels.UAN(_SHAPE[1], _COMPONENTS, update=update, backend=backend).train(training)
    x = torch.randn(_SHAPE, requires_grad=training)
    grad = torch.randn(_SHAPE)
    launches: Counter = Counter()

    def stub(kernel, *args, grid, warmup, **kwargs):
        launches[_kernel_name(kernel)] += 1

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with intercepted_launches(triton_kernels, stub):
            _step(layer, x, grad, training)
            layer.zero_grad(set_to_none=True)
            x.grad = None
            launches.clear()
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                _step(layer, x, grad, training)
    finally:
        torch.set_num_threads(threads)
    count = _count_events(prof.events())
    count.triton_kernels = sum(launches.values())
    count.triton_by_name = dict(sorted(launches.items()))
    return count


def count_launches(backends=BACKENDS) -> Dict[str, Dict[str, LaunchCount]]:
    """:func:`count_phase` for every phase of each backend that can run here.

    A backend that cannot run (e.g. the C++ extension is not built) maps to
    the reason instead.
    """
    from uan_kernels import _backends

    counts = {}
    for backend in backends:
        why = _backends.unavailable_reason(backend, torch.device("cpu"))
        counts[backend] = why or {phase: count_phase(backend, phase) for phase in PHASES}
    return counts


def main() -> None:
    counts = count_launches(sys.argv[1:] or BACKENDS)
    print(json.dumps({b: c if isinstance(c, str) else {p: asdict(v) for p, v in c.items()} for b, c in counts.items()}))


if __name__ == "__main__":
    main()
