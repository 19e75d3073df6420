"""What the error paths need, importing nothing heavy: the exception classes of modules already
loaded, and out-of-memory recognised in every wording.

An error path that imported ddpm_core.data, .fid or .training to name their exception classes
would load torch, scikit-learn, SciPy and torch-fidelity (seconds) before printing one line.
`loaded` gives the same classes without an import: an exception of a class whose module was
never imported cannot have been raised.
"""

from __future__ import annotations

import re
import sys

# CUDA ("CUDA out of memory"), MPS ("MPS backend out of memory"), the CPU allocator
# ("DefaultCPUAllocator: can't allocate memory"); MemoryError (Python, numpy) is the class.
_OOM_WORDS = ("out of memory", "can't allocate memory", "cannot allocate memory")


def loaded(*names: str) -> tuple[type[BaseException], ...]:
    """The exception classes named `module:Class` whose modules are already imported."""
    out = []
    for name in names:
        module, _, cls = name.partition(":")
        found = getattr(sys.modules.get(module), cls, None)
        if isinstance(found, type) and issubclass(found, BaseException):
            out.append(found)
    return tuple(out)


def is_out_of_memory(e: BaseException) -> bool:
    """An allocation that failed: MemoryError, or a RuntimeError in CUDA's, MPS's or the CPU
    allocator's wording."""
    return isinstance(e, MemoryError) or (
        isinstance(e, RuntimeError) and any(w in str(e).lower() for w in _OOM_WORDS))


def out_of_memory_line(e: BaseException, hint: str) -> str:
    """`out of memory (<what the allocator said>); <hint>` on one line."""
    first = (str(e).strip().splitlines() or [""])[0]
    first = re.sub(r"^\[enforce fail at [^\]]*\]\s*(err == 0\.\s*)?", "", first)[:120]
    return f"out of memory ({first or type(e).__name__}); {hint}"
