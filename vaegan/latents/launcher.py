"""Running one function as several ranks: processes started on this machine, or launched by torchrun, with one
progress bar for all of them. Used by dataset encoding, where ranks share nothing but the output folder (there
are no gradients to synchronise, so plain processes do and Lightning is not needed)."""

from __future__ import annotations

import multiprocessing as mp
import os
import queue
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from tqdm.auto import tqdm


@dataclass(frozen=True)
class Rank:
    """Which process this is: its rank among all, and its place on its machine."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1

    @classmethod
    def from_torchrun(cls) -> Rank:
        """torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE), or a single process."""
        world_size = int(os.environ.get("WORLD_SIZE", "1"))
        if world_size == 1:
            return cls()
        return cls(int(os.environ["RANK"]), world_size, int(os.environ.get("LOCAL_RANK", "0")),
                   int(os.environ.get("LOCAL_WORLD_SIZE", "1")))

    def device(self, device: str) -> torch.device:
        """"cuda" means this rank's GPU (cuda:LOCAL_RANK) when several processes share a machine."""
        resolved = torch.device(device)
        if resolved.type == "cuda" and resolved.index is None and self.local_world_size > 1:
            return torch.device("cuda", self.local_rank)
        return resolved


class SharedProgress:
    """A rank's side of the launching process's progress bar: counts into shared values, as a tqdm bar would
    (`total` is set once, `update` counts items), and counts finished parts of the work (shards) and errors for
    the words beside it (`parts`)."""

    def __init__(self, done: Any, total: Any, parts: Any = None):
        self.done, self.shared_total = done, total
        self.parts = parts  # shared (parts done, parts in all, errors), or None

    def add_parts(self, done: int = 0, total: int = 0, errors: int = 0) -> None:
        if self.parts is not None:
            with self.parts.get_lock():
                self.parts[0] += done
                self.parts[1] += total
                self.parts[2] += errors

    @property
    def total(self) -> int:
        return self.shared_total.value

    @total.setter
    def total(self, count: int | None) -> None:
        with self.shared_total.get_lock():
            self.shared_total.value += count or 0

    def update(self, count: int) -> None:
        with self.done.get_lock():
            self.done.value += count

    def close(self) -> None: ...


@dataclass(frozen=True)
class RankFailure:
    """A rank that raised instead of returning: its exception, as text (exceptions do not always pickle), and
    whether it was a failure the user can fix (a bad file or value: `ValueError`, `OSError`) rather than a bug."""

    rank: int
    error: str
    expected: bool = False


def worker_start_method() -> str | None:
    """Fork DataLoader workers on Linux, as PyTorch does by default there.

    Said explicitly because ranks started by `launch` are spawned, and inside a spawned process multiprocessing
    defaults to spawn too: every worker would then re-import torch and vaegan, seconds per worker.
    """
    return "fork" if sys.platform == "linux" else None


def default_num_workers(local_processes: int) -> int:
    """Data-loading processes per rank: the cores left after the ranks themselves, at most 8, at least 1."""
    return max(1, min(8, (os.cpu_count() or 2) // local_processes - 1))


def launch(target: Callable[..., Any], job: Any, num_processes: int, unit: str, description: str,
           show_progress: bool, describe: Callable[[int, int, int, float], str] | None = None) -> list[Any]:
    """`target(job, Rank(r, n, r, n), progress)` in n fresh processes on this machine; their results by rank.

    `describe(parts done, parts in all, errors, seconds)` words the parts the ranks count (`SharedProgress.add_parts`)
    beside the bar.

    `job` is picklable and names the `device` the ranks run on; results carry their `rank`.

    Fresh ("spawn") processes, not forks: each rank then starts its own CUDA context and DataLoader workers. A
    rank that fails does not stop the others (their work is still worth having); the failures are raised once
    all have ended.
    """
    context = mp.get_context("spawn")
    done, total, parts = context.Value("q", 0), context.Value("q", 0), context.Array("q", 3)
    start = time.perf_counter()
    results = context.Queue()
    processes = [
        context.Process(target=_rank_process, args=(target, job, rank, num_processes, done, total, parts, results))
        for rank in range(num_processes)
    ]
    for process in processes:
        process.start()
    collected: list[Any] = []
    with tqdm(total=0, unit=unit, desc=f"{description} ({num_processes} processes)", disable=not show_progress) as bar:
        while len(collected) < num_processes:
            try:
                collected.append(results.get(timeout=0.5))
            except queue.Empty:
                if not any(process.is_alive() for process in processes):
                    break
            bar.total = total.value
            bar.update(done.value - bar.n)
            if describe is not None and parts[1]:
                bar.set_postfix_str(describe(parts[0], parts[1], parts[2], time.perf_counter() - start),
                                    refresh=False)
    for process in processes:
        process.join()
    failures = [result for result in collected if isinstance(result, RankFailure)]
    answered = {result.rank for result in collected}
    failures += [RankFailure(rank, f"exit code {process.exitcode}") for rank, process in enumerate(processes)
                 if process.exitcode and rank not in answered]
    if failures:
        if all(failure.expected for failure in failures):  # the same bad input seen by every rank: say it once
            raise ValueError(failures[0].error)
        reasons = "; ".join(f"rank {failure.rank}: {failure.error}" for failure in failures)
        raise RuntimeError(f"{description} failed in {len(failures)} process(es): {reasons}. Rerun to resume")
    return sorted(collected, key=lambda result: result.rank)


def _rank_process(target: Callable[..., Any], job: Any, rank: int, world_size: int, done: Any, total: Any,
                  parts: Any, results: Any) -> None:
    if torch.device(job.device).type == "cpu":
        # Ranks share the cores: without this each would start one thread per core and they would thrash.
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // world_size))
    try:
        results.put(target(job, Rank(rank, world_size, rank, world_size), SharedProgress(done, total, parts)))
    except BaseException as error:
        if isinstance(error, (ValueError, OSError)):  # a message for the user, which the launcher passes on
            results.put(RankFailure(rank, str(error), expected=True))
        else:
            traceback.print_exc()
            results.put(RankFailure(rank, f"{type(error).__name__}: {error}"))
        raise SystemExit(1) from error
