"""Where the time of a job goes: named stages, and Python stack samples for flame graphs.

    with profiling.Profile() as prof:        # stages count only while a Profile is active
        ...                                  # code that runs `with profiling.stage("render"):`
    prof.seconds()                           # {"render": 4.1, "rig": 2.0, ...}, exclusive

`stage` is a no-op costing one global read when no profile is active, so the pipelines keep their
stage marks always. Stages nest; each stage's time excludes the stages inside it, so the
seconds add up to at most the profile's wall time (the rest is "other").

`StackSampler` samples the main thread's Python stack every few milliseconds from a second
thread and writes the collapsed-stack format that flamegraph.pl, speedscope and inferno read
(`frame;frame;frame count`, one line per distinct stack).
"""

from __future__ import annotations

import collections
import contextlib
import os
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

_active: Profile | None = None


class Profile:
    """Exclusive seconds per stage while active (one at a time, main thread)."""

    def __init__(self) -> None:
        self.totals: dict[str, float] = collections.defaultdict(float)
        self.counts: dict[str, int] = collections.defaultdict(int)
        self._stack: list[list] = []  # [name, start, time spent in nested stages]
        self.wall = 0.0

    def __enter__(self) -> Profile:
        global _active
        if _active is not None:
            raise RuntimeError("a profile is already active")
        _active, self._t0 = self, time.perf_counter()
        return self

    def __exit__(self, *exc) -> None:
        global _active
        _active, self.wall = None, time.perf_counter() - self._t0

    def seconds(self) -> dict[str, float]:
        return dict(self.totals)

    def report(self, stages: tuple[str, ...]) -> dict:
        """Seconds and shares of the wall time for `stages` in order, then "other"."""
        wall = max(self.wall, 1e-9)
        out = {name: self.totals.get(name, 0.0) for name in stages}
        out["other"] = max(wall - sum(self.totals.values()), 0.0)
        return {"wall_s": round(wall, 3),
                "seconds": {k: round(v, 3) for k, v in out.items()},
                "shares": {k: round(v / wall, 3) for k, v in out.items()}}  # fmt: skip


def _wait_for_gpu() -> None:
    """On a GPU, a stage's kernels run after its Python returns: wait for them, so that their
    time lands in the stage that launched them (only while profiling)."""
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_initialized():
        torch.cuda.synchronize()


@contextlib.contextmanager
def stage(name: str) -> Iterator[None]:
    prof = _active
    if prof is None or threading.current_thread() is not threading.main_thread():
        yield
        return
    entry = [name, time.perf_counter(), 0.0]
    prof._stack.append(entry)
    try:
        yield
        _wait_for_gpu()  # not after an error: a failed GPU would raise again and hide it
    finally:
        prof._stack.pop()
        spent = time.perf_counter() - entry[1]
        prof.totals[name] += spent - entry[2]
        prof.counts[name] += 1
        if prof._stack:
            prof._stack[-1][2] += spent


class StackSampler:
    """Samples the main thread's Python stack every `interval_s` into collapsed stacks."""

    def __init__(self, interval_s: float = 0.005) -> None:
        self.interval = interval_s
        self.stacks: collections.Counter[str] = collections.Counter()
        self._stop = threading.Event()
        self._target = threading.main_thread().ident
        self._thread = threading.Thread(target=self._run, name="stack-sampler", daemon=True)

    def __enter__(self) -> StackSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            frame = sys._current_frames().get(self._target)
            names = []
            while frame is not None:
                code = frame.f_code
                names.append(f"{code.co_name} ({_short(code.co_filename)}:{code.co_firstlineno})")
                frame = frame.f_back
            if names:
                self.stacks[";".join(reversed(names))] += 1

    def write(self, path: str | os.PathLike) -> int:
        """Collapsed stacks (`a;b;c count`), most frequent first; returns the sample count."""
        from .io import atomic_path

        text = "".join(f"{stack} {n}\n" for stack, n in self.stacks.most_common())
        with atomic_path(Path(path)) as tmp:
            tmp.write_text(text)
        return sum(self.stacks.values())


def _short(filename: str) -> str:
    """A source path from the package folder on (`render/io.py`), else its base name."""
    parts = Path(filename).parts
    for i in range(len(parts) - 1, -1, -1):
        if parts[i] in ("render", "deform", "reconstruct", "distill", "avatar", "site-packages"):
            return "/".join(parts[i + (parts[i] == "site-packages") :])
    return parts[-1] if parts else filename
