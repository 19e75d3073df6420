"""Progress of long loops: a tqdm bar on a terminal, periodic plain lines otherwise.

Under `dvc repro` in a terminal the bar shows; when output goes to a file or a pipe (CI, a
queued experiment, a log) a line `<desc>: n/total (p%), r <unit>/s, eta s` is printed every
`every` seconds instead, plus one at the end, so a long stage is never silent.
"""

from __future__ import annotations

import contextlib
import sys
import time
from typing import Any, TextIO


class Progress(contextlib.AbstractContextManager):
    """A counter up to `total`; `update(n)` advances it. Use as a context manager."""

    def __init__(self, total: int, desc: str, unit: str = "it", every: float = 10.0,
                 enabled: bool = True, stream: TextIO | None = None) -> None:
        self.total, self.desc, self.unit, self.every = int(total), desc, unit, every
        self.n, self.note, self._shown = 0, "", -1  # _shown: n of the last line printed
        self.stream = stream if stream is not None else sys.stderr
        tty = self.stream.isatty()
        self._plain = enabled and not tty  # periodic lines instead of the bar
        self._t0 = self._last = time.perf_counter()
        from tqdm import tqdm

        self._bar = tqdm(total=self.total, desc=desc, unit=unit, dynamic_ncols=True, leave=False,
                         file=self.stream, disable=not (enabled and tty))

    def update(self, n: int = 1) -> None:
        self.n += n
        self._bar.update(n)
        now = time.perf_counter()
        if self._plain and now - self._last >= self.every:
            self._last = now
            self._line(now)

    def skip(self, n: int, note: str = "") -> None:
        """Take n from the total (work found done: a unit read back) and show `note`."""
        self.total -= n
        self._bar.total = self.total
        self.set_note(note)

    def set_note(self, note: str) -> None:
        """A short text after the counts (e.g. "unit 3/8"), on the bar and in the lines."""
        self.note = note
        self._bar.set_postfix_str(note, refresh=True)

    def _line(self, now: float) -> None:
        self._shown = self.n
        rate = self.n / max(now - self._t0, 1e-9)
        eta = (self.total - self.n) / rate if rate > 0 else float("inf")
        pct = 100.0 * self.n / max(self.total, 1)
        print(f"{self.desc}: {self.n}/{self.total} ({pct:.0f}%), {rate:.3g} {self.unit}/s, "
              f"eta {eta:.0f} s" + (f", {self.note}" if self.note else ""), file=sys.stdout,
              flush=True)

    def close(self) -> None:
        self._bar.close()
        if (self._plain and self.n and self.n != self._shown
                and time.perf_counter() - self._t0 >= self.every):
            self._line(time.perf_counter())

    def __exit__(self, *exc: object) -> None:
        self.close()


def counting(model: Any, bar: Progress) -> Any:
    """`model` wrapped so that every call `(x, t)` advances `bar` by one (network calls)."""
    import torch

    class _Counting(torch.nn.Module):
        def __init__(self, net: torch.nn.Module) -> None:
            super().__init__()
            self.net = net

        def forward(self, *args: Any, **kwargs: Any) -> Any:
            out = self.net(*args, **kwargs)
            bar.update(1)
            return out

    return _Counting(model)
