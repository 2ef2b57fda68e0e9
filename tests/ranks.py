"""Two (or more) CPU ranks over gloo for the distributed tests.

gloo waits 30 min for a peer by default. A run here takes seconds, so a stuck rank fails within minutes, and each
rank writes every thread's stack to a file once a minute while it runs; a failure shows each rank's latest. A timeout
gets one more try on a fresh port (stop 24's CI saw one rank wait 30 min in a ``full_tensor()`` for a peer, once,
after ~1,900 other tests; it did not recur in 40 back-to-back runs here), so a one-off hang passes with a warning that
carries the stacks, in pytest's warnings summary. A second one, or any other error, fails at once.
"""

from __future__ import annotations

import datetime
import faulthandler
import os
import re
import socket
import time
import warnings
from contextlib import contextmanager
from pathlib import Path

import torch.distributed as dist
import torch.multiprocessing as mp
from torch.multiprocessing.spawn import ProcessException

TIMEOUT_S = 240
STACKS_EVERY_S = 60


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def gloo_group(rank: int, world: int, port: int, prefix: str, **env: str):
    """The default process group of one worker, for the length of the block."""
    with open(f"{prefix}.rank{rank}.stacks", "w") as stacks:
        faulthandler.dump_traceback_later(STACKS_EVERY_S, repeat=True, file=stacks)
        try:
            os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), **env)
            dist.init_process_group("gloo", rank=rank, world_size=world,
                                    timeout=datetime.timedelta(seconds=TIMEOUT_S))
            try:
                yield
            finally:
                dist.destroy_process_group()
        finally:
            faulthandler.cancel_dump_traceback_later()


def _stacks(prefix: Path, world: int) -> str:
    """Each rank's latest stacks: the last of the dumps in its file (faulthandler heads each with "Timeout (")."""
    parts = []
    for r in range(world):
        path = Path(f"{prefix}.rank{r}.stacks")
        text = path.read_text() if path.exists() else ""
        if "Timeout (" in text:
            parts.append(f"--- rank {r} ---\nTimeout (" + text.rsplit("Timeout (", 1)[-1])
    return "\n".join(parts) or "(no rank ran long enough to write its stacks)"


def _spawn(worker, world: int, prefix: Path, args: tuple) -> None:
    ctx = mp.start_processes(worker, args=(world, free_port(), str(prefix), *args), nprocs=world, join=False,
                             start_method="spawn")
    deadline = time.monotonic() + TIMEOUT_S + 60
    while not ctx.join(timeout=5):
        if time.monotonic() > deadline:  # stuck outside gloo's own timeout
            for p in ctx.processes:
                p.kill()
            raise TimeoutError(f"the workers did not finish in {TIMEOUT_S + 60} s")


def run_ranks(worker, tmp_path: Path, *args, world: int = 2) -> Path:
    """Run ``worker(rank, world, port, prefix, *args)`` on ``world`` processes, each inside ``gloo_group``; returns
    the ``prefix`` (a path stem under ``tmp_path``) the successful attempt's workers were given for their files."""
    for attempt in (1, 2):
        prefix = tmp_path / f"attempt{attempt}"
        try:
            _spawn(worker, world, prefix, args)
            return prefix
        except (ProcessException, TimeoutError) as exc:
            stuck = isinstance(exc, TimeoutError) or re.search(r"timed out|timeout", str(exc), re.IGNORECASE)
            if attempt == 2 or not stuck:
                raise AssertionError(f"the workers failed:\n{exc}\n{_stacks(prefix, world)}") from exc
            warnings.warn(f"workers stuck in gloo; trying once more. Stacks:\n{_stacks(prefix, world)}",
                          stacklevel=2)
    raise AssertionError("unreachable")
