"""Run a function on P real gloo processes on this machine and collect what each rank returns.

One ``spawn`` per call: every rank initialises a gloo process group through a ``file://`` rendezvous in a fresh
temporary directory, runs ``fn(rank, world_size, *args)``, and writes its (picklable) result, or the formatted
exception, to a file. The parent waits with a deadline and kills every rank when it passes, so a hang fails the
test instead of stalling CI.
"""

from __future__ import annotations

import datetime
import os
import pickle
import tempfile
import time
import traceback
from typing import Any, Callable, List

import torch.distributed as dist
import torch.multiprocessing as mp

__all__ = ["RankFailed", "run_ranks", "run_ranks_once"]

GLOO_TIMEOUT_S = 60


class RankFailed(AssertionError):
    """A rank raised, or the ranks did not finish before the deadline."""


def _entry(rank: int, world_size: int, workdir: str, fn: Callable, args: tuple) -> None:
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    import torch

    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"file://{os.path.join(workdir, 'rendezvous')}", rank=rank, world_size=world_size,
        timeout=datetime.timedelta(seconds=GLOO_TIMEOUT_S),
    )
    try:
        result: Any = ("ok", fn(rank, world_size, *args))
    except BaseException:  # reported to the parent, which fails the test with the traceback
        result = ("error", traceback.format_exc())
    with open(os.path.join(workdir, f"rank{rank}.pkl"), "wb") as f:
        pickle.dump(result, f)
    if result[0] == "ok":
        dist.barrier()  # no rank tears the group down while another still has messages in flight
    dist.destroy_process_group()
    # Skip interpreter teardown: gloo's background threads can abort the process there ("terminate called without
    # an active exception") after the result is already written, which would read as a failed rank.
    os._exit(0)


def run_ranks(fn: Callable, world_size: int, *args, timeout_s: float = 300.0) -> List[Any]:
    """Run ``fn(rank, world_size, *args)`` on ``world_size`` gloo processes; return the ranks' results in order.

    Raises:
        RankFailed: a rank raised (its traceback is in the message) or the deadline passed (all ranks killed).
    """
    with tempfile.TemporaryDirectory(prefix="noflash-dist-") as workdir:
        ctx = mp.start_processes(
            _entry, args=(world_size, workdir, fn, args), nprocs=world_size, join=False, start_method="spawn"
        )
        deadline = time.monotonic() + timeout_s
        try:
            while not ctx.join(timeout=max(0.1, min(5.0, deadline - time.monotonic()))):
                if time.monotonic() > deadline:
                    raise RankFailed(f"{world_size} ranks did not finish within {timeout_s:.0f} s (a hang?)")
        finally:
            for p in ctx.processes:
                if p.is_alive():
                    p.kill()
                    p.join(5)
        results = []
        for rank in range(world_size):
            with open(os.path.join(workdir, f"rank{rank}.pkl"), "rb") as f:
                status, value = pickle.load(f)
            if status != "ok":
                raise RankFailed(f"rank {rank} raised:\n{value}")
            results.append(value)
        return results


_outcomes: dict = {}


def run_ranks_once(fn: Callable, world_size: int, *args, timeout_s: float = 300.0) -> List[Any]:
    """:func:`run_ranks`, memoised per ``(fn, world_size, args)`` with its failure: the many tests that read one
    spawn's results share it, and a failed spawn is reported by each of them without running again."""
    key = (fn.__module__, fn.__qualname__, world_size, args)
    if key not in _outcomes:
        try:
            _outcomes[key] = (run_ranks(fn, world_size, *args, timeout_s=timeout_s), None)
        except RankFailed as exc:
            _outcomes[key] = (None, exc)
    results, failure = _outcomes[key]
    if failure is not None:
        raise failure
    return results
