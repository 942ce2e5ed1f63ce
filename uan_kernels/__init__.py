"""uan-kernels: fast Unsupervised Adaptive Normalization (UAN) for PyTorch.

Public API: :class:`UAN`, :class:`SyncUAN` (statistics of a whole
``torch.distributed`` process group), :class:`MixtureNorm`,
:func:`convert_batchnorm`, :mod:`uan_kernels.functional`,
:mod:`uan_kernels.reference`, and the operators ``torch.ops.uan.forward`` /
``torch.ops.uan.backward`` and the operators per pass (registered by
``import uan_kernels`` when the compiled extension is installed; see
:func:`available_backends` and :mod:`uan_kernels.ops`).
"""
from . import functional, reference
from ._backends import BACKEND_NAMES, MAX_FUSED_COMPONENTS
from .mixture_norm import MixtureNorm
from .modules import UAN, SyncUAN, convert_batchnorm

__version__ = "0.1.0"


def available_backends(device="cpu"):
    """Names of the backends that can run tensors on ``device`` here."""
    import torch

    from . import _backends

    device = torch.device(device)
    return [name for name in ("cpp", "triton", "reference") if not _backends.unavailable_reason(name, device)]


__all__ = [
    "UAN",
    "SyncUAN",
    "MixtureNorm",
    "convert_batchnorm",
    "functional",
    "reference",
    "available_backends",
    "BACKEND_NAMES",
    "MAX_FUSED_COMPONENTS",
]
