"""Backend registry: which implementations of the UAN function can run where.

Every backend exposes the same two differentiable functions (and may add
``eval_mixture(x, mu, log_sigma, mix_logits, weight, bias, eps) -> out``, the
eval of update="moving_average" without computing its variances first):

* ``train(x, mu, log_sigma, mix_logits, weight, bias, eps) -> (out, mean, var, mass)``
* ``eval(x, mu, log_sigma, mix_logits, mean, var, weight, bias, eps) -> out``

and ``passes``: the fused backends' operators per pass (``statistics``,
``statistics_finalize``, ``normalize``, ``backward_reduce``,
``backward_elementwise``), which :class:`uan_kernels.SyncUAN` runs with
collectives between them; None for the reference, which SyncUAN differentiates
with autograd instead.
"""
from __future__ import annotations

import importlib
import warnings
from types import SimpleNamespace
from typing import Callable, Dict, Tuple

import torch

from . import reference

BACKEND_NAMES = ("auto", "cpp", "triton", "reference")

# The fused kernels keep an element's K per-component values in registers
# (CUDA/Triton) or fixed stack arrays (C++), so K is bounded there.
MAX_FUSED_COMPONENTS = 16


def check_components(name: str, num_components: int) -> None:
    """Raise when a fused backend is asked for more components than its kernels hold."""
    if num_components > MAX_FUSED_COMPONENTS and name in ("cpp", "triton"):
        raise ValueError(
            f"backend {name!r} supports at most {MAX_FUSED_COMPONENTS} components, got {num_components}; "
            "use backend='reference'"
        )


def check_backend_name(name: str) -> None:
    if name not in BACKEND_NAMES:
        raise ValueError(f"unknown backend {name!r}; expected one of {BACKEND_NAMES}")


def _load_cpp() -> SimpleNamespace:
    ops = importlib.import_module("uan_kernels.ops")
    return SimpleNamespace(train=ops.train_forward, eval=ops.eval_forward, eval_mixture=ops.eval_mixture_forward,
                           module=ops, passes=ops)


def _load_triton() -> SimpleNamespace:
    mod = importlib.import_module("uan_kernels.triton")
    return SimpleNamespace(train=mod.train_forward, eval=mod.eval_forward, eval_mixture=mod.eval_mixture_forward,
                           module=mod, passes=mod)


def _load_reference() -> SimpleNamespace:
    return SimpleNamespace(train=reference.uan_train, eval=reference.uan_eval, module=reference, passes=None)


_LOADERS: Dict[str, Callable[[], SimpleNamespace]] = {
    "cpp": _load_cpp,
    "triton": _load_triton,
    "reference": _load_reference,
}
_loaded: Dict[str, Tuple[SimpleNamespace | None, str]] = {}


def _load(name: str) -> Tuple[SimpleNamespace | None, str]:
    """Import a backend once; remember why it failed so every caller sees the reason."""
    if name not in _loaded:
        try:
            _loaded[name] = (_LOADERS[name](), "")
        except (ImportError, OSError, RuntimeError) as err:
            _loaded[name] = (None, f"{type(err).__name__}: {err}")
    return _loaded[name]


def unavailable_reason(name: str, device: torch.device | None = None) -> str:
    """Empty string when backend ``name`` can run on ``device``; otherwise why not."""
    backend, why = _load(name)
    if backend is None:
        return f"backend {name!r} cannot be loaded ({why})"
    if device is None:
        return ""
    if name == "cpp" and not backend.module.has_kernel(device.type):
        return (
            f"backend 'cpp' has no {device.type.upper()} kernel in this build of uan_kernels._C "
            "(CUDA kernels are compiled only when torch has CUDA and nvcc is found at install time)"
        )
    if name == "triton" and device.type == "cpu" and not backend.module.interpreter.INTERPRETED:
        return (
            "backend 'triton' runs CPU tensors only under the Triton interpreter: "
            "set TRITON_INTERPRET=1 before importing uan_kernels"
        )
    if name == "triton" and device.type not in ("cpu", "cuda"):
        return f"backend 'triton' does not support device type {device.type!r}"
    return ""


def has_fused_moving_average_update(device: torch.device) -> bool:
    """Whether ``torch.ops.uan.moving_average_update_`` has a kernel for ``device`` (one launch)."""
    backend, _ = _load("cpp")
    return backend is not None and backend.module.has_kernel(device.type)


def has_em_helpers(device: torch.device) -> bool:
    """Whether MixtureNorm's C++ EM helpers (``uan::em_m_step``, ``uan::gather_samples``) run on ``device``: CPU."""
    backend, _ = _load("cpp")
    return backend is not None and device.type == "cpu"


def check_available(name: str) -> None:
    """Raise at construction time when an explicitly requested backend cannot load."""
    check_backend_name(name)
    if name not in ("auto", "reference"):
        backend, why = _load(name)
        if backend is None:
            raise RuntimeError(f"backend {name!r} is not available here: {why}")


def resolve(name: str, device: torch.device) -> SimpleNamespace:
    """The backend that runs tensors on ``device`` for the requested ``name``.

    ``"auto"`` is the compiled extension (C++ on CPU, C++/CUDA on CUDA); on a
    GPU whose build lacks CUDA kernels it falls back to Triton, and when no
    fused backend can run, to the reference.
    """
    check_backend_name(name)
    if name == "auto":
        candidates = ("cpp", "triton", "reference") if device.type == "cuda" else ("cpp", "reference")
        for candidate in candidates:
            if not unavailable_reason(candidate, device):
                if candidate == "reference":
                    warnings.warn(
                        f"uan_kernels: no fused backend can run on {device} "
                        f"({unavailable_reason('cpp', device)}); using the slow reference",
                        stacklevel=3,
                    )
                return _load(candidate)[0]
        raise RuntimeError(f"no UAN backend can run on {device}")
    why = unavailable_reason(name, device)
    if why:
        raise RuntimeError(why)
    return _load(name)[0]


# Load the compiled extension's backend (and the reference) now, at import:
# this registers torch.ops.uan.* for anyone who imports uan_kernels (or says
# later, on use, why the extension could not load), and resolving a backend
# inside a function that torch.compile traces must be a dictionary lookup,
# since the tracer cannot follow importlib. The Triton backend, slower to
# import, is loaded when a layer asks for it by name.
_load("cpp")
_load("reference")
