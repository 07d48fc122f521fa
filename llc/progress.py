"""Progress of work that takes more than a few seconds with a big model: emit, deploy, verify.

Lines, not a redrawn bar, so a terminal, a CI log and a pipe read the same;
at most one line every ``interval`` seconds, and always the last one; nothing
for work under WORTH_SAYING bytes (a small model's compile stays as quiet as it was).
"""

from __future__ import annotations

import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Callable

MB = 1e6
WORTH_SAYING = 64 * 10**6  # bytes; less than this goes by too fast to need progress


def to_stderr(line: str) -> None:
    print(f"llc: {line}", file=sys.stderr, flush=True)


@dataclass
class Progress:
    """Bytes done of a known total, under a label (``emit``, ``phone1: push``); thread-safe."""

    label: str
    total: int
    say: Callable[[str], None] | None = to_stderr
    interval: float = 2.0
    done: int = 0
    started: float = field(default_factory=time.monotonic)
    _last: float = field(default_factory=time.monotonic)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def add(self, n: int) -> None:
        with self._lock:
            finished = self.done < self.total <= self.done + n
            self.done += n
            now = time.monotonic()
            if self.say is None or self.total < WORTH_SAYING or not (
                    finished or (n and now - self._last >= self.interval)):
                return
            self._last = now
            rate = self.done / MB / max(now - self.started, 1e-6)
            self.say(f"{self.label}: {self.done / MB:,.0f} of {self.total / MB:,.0f} MB ({rate:,.0f} MB/s)")
