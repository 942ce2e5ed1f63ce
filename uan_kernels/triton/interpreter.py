"""Whether the Triton kernels run in Triton's interpreter, the only way to run them on CPU tensors."""
import os

import triton


def _interpreter_enabled() -> bool:
    """Triton's own reading of ``TRITON_INTERPRET`` (``triton.knobs`` since Triton 3.4)."""
    knobs = getattr(triton, "knobs", None)
    if knobs is not None:
        return bool(knobs.runtime.interpret)
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


# Whether @triton.jit functions run in the interpreter (the only way to run
# them on CPU tensors); Triton reads the setting when the kernels of this package are defined.
INTERPRETED: bool = _interpreter_enabled()
