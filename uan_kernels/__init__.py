"""uan-kernels: fast Unsupervised Adaptive Normalization (UAN) for PyTorch.

Public API: :class:`UAN`, :class:`MixtureNorm`, :func:`convert_batchnorm`,
:mod:`uan_kernels.functional`, :mod:`uan_kernels.reference`, and the operators
``torch.ops.uan.forward`` / ``torch.ops.uan.backward`` (registered by
``import uan_kernels`` when the compiled extension is installed; see
:func:`available_backends`).
"""
import importlib.util as _importlib_util

from . import functional, reference
from ._backends import BACKEND_NAMES, MAX_FUSED_COMPONENTS

# Importing the package registers torch.ops.uan.* (the extension's schemas and
# kernels, with their fake implementations and autograd) whenever the compiled
# extension is installed; a broken build fails here, loudly. Without it, the
# pure-PyTorch backends still work and the fused ones explain what is missing.
if _importlib_util.find_spec("uan_kernels._C") is not None:
    from . import ops  # noqa: F401
from .mixture_norm import MixtureNorm
from .modules import UAN, convert_batchnorm

__version__ = "0.1.0"


def available_backends(device="cpu"):
    """Names of the backends that can run tensors on ``device`` here."""
    import torch

    from . import _backends

    device = torch.device(device)
    return [name for name in ("cpp", "triton", "reference") if not _backends.unavailable_reason(name, device)]


__all__ = [
    "UAN",
    "MixtureNorm",
    "convert_batchnorm",
    "functional",
    "reference",
    "available_backends",
    "BACKEND_NAMES",
    "MAX_FUSED_COMPONENTS",
]
