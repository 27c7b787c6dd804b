"""Run independent jobs side by side in worker processes (``python -m medkd compare --jobs N``).

:func:`run_jobs` runs each :class:`Job` (a picklable function and its arguments) in a pool of ``workers`` processes
started with ``spawn`` (a fresh interpreter, no state copied from the caller; workers are reused from job to job).
:class:`JobPool` starts the workers ahead of the jobs, so that their start-up overlaps other work, and
:meth:`JobPool.start` runs jobs in the background while the caller works, holding back those that need the caller's
work until it releases them (``compare`` starts the runs that do not read the teacher while it trains).
Each worker uses ``threads`` intra-op threads (``torch.set_num_threads``). On a machine with several GPUs each worker
sees one of them (``CUDA_VISIBLE_DEVICES``), round-robin; with one GPU the workers share it. Each job's standard
output and error (the stages' logs and progress bars) go to its log file, opened for appending. A failed job does
not stop the pool at once: jobs not started yet are cancelled, running ones finish, and :class:`JobsFailed` names
each failed job with its error (a :class:`~medkd.errors.MedkdError`'s message, else the error's type and first line;
the traceback of a bug stays in the job's log). A worker that dies fails its job and the pool's other unfinished jobs
instead of hanging. With ``workers=1`` the jobs run one after another in the calling process, writing to the
console, and an error propagates as it is.
"""

from __future__ import annotations

import concurrent.futures as cf
import importlib
import multiprocessing as mp
import os
import sys
import threading
import time
import traceback
from collections.abc import Callable, Collection, Hashable, Mapping, Sequence
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from medkd.errors import user_error

__all__ = ["Job", "JobPool", "JobsFailed", "Schedule", "run_jobs", "threads_per_job", "visible_gpus"]


@dataclass(frozen=True)
class Job:
    """One unit of work: ``fn(*args)`` (``fn`` importable by name, ``args`` picklable), known as ``name`` (e.g.
    ``"kd seed 1"``), writing its output to ``log`` when it runs in a worker."""

    key: Hashable
    name: str
    fn: Callable[..., Any]
    args: tuple = ()
    log: Path | None = None


class JobsFailed(RuntimeError):
    """Some jobs failed. ``failures`` maps each failed job's name to its error, in the jobs' order; ``cancelled``
    lists the jobs that were never started; ``finished`` counts the jobs that succeeded."""

    def __init__(self, failures: Mapping[str, str], cancelled: Sequence[str], finished: int, logs: Mapping[str, Path]):
        self.failures, self.cancelled, self.finished = dict(failures), list(cancelled), finished
        lines = [
            f"  - {name}: {error}" + (f" (log: {logs[name]})" if name in logs else "")
            for name, error in failures.items()
        ]
        total = len(failures) + len(cancelled) + finished
        super().__init__(
            f"{len(failures)} of {total} runs failed ({finished} finished, {len(cancelled)} not started):\n"
            + "\n".join(lines)
        )


def threads_per_job(workers: int) -> int:
    """This process's intra-op thread count (``OMP_NUM_THREADS``, else the cores) split among ``workers``, ≥ 1."""
    return max(1, torch.get_num_threads() // max(1, workers))


def visible_gpus(device_set: bool = False) -> list[str]:
    """The GPUs to spread workers over: the entries of ``CUDA_VISIBLE_DEVICES`` (else ``0..count-1``) when CUDA
    has more than one device; empty (leave the environment alone) with one GPU, none, or a device chosen by the
    caller (``device_set``)."""
    if device_set or not torch.cuda.is_available() or torch.cuda.device_count() < 2:
        return []
    listed = [d.strip() for d in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if d.strip()]
    return listed[: torch.cuda.device_count()] or [str(i) for i in range(torch.cuda.device_count())]


def _describe(error: BaseException) -> str:
    """A user error's message (its own lines indented), else the original error's type and first line."""
    found = user_error(error)
    if found is not None:
        return str(found).strip().replace("\n", "\n    ")
    root, seen = error, set()
    while (root.__cause__ or root.__context__) is not None and id(root) not in seen:  # the error MONAI wrapped
        seen.add(id(root))
        root = root.__cause__ or root.__context__
    text = str(root).strip().splitlines()
    return f"{type(root).__name__}: {text[0] if text else ''}"


def _init_worker(threads: int, slots: Any, gpus: Sequence[str], preload: Sequence[str] = ()) -> None:
    slot = slots.get()
    if gpus:  # before CUDA is initialised in this process
        os.environ["CUDA_VISIBLE_DEVICES"] = gpus[slot % len(gpus)]
    torch.set_num_threads(threads)
    for module in preload:
        importlib.import_module(module)


def _run_in_worker(job: Job) -> tuple[bool, Any]:
    sys.stdout.flush()
    sys.stderr.flush()
    if job.log is not None:
        job.log.parent.mkdir(parents=True, exist_ok=True)
        with open(job.log, "a") as f:  # fds 1 and 2: Python's and C's output, and the logging handlers', follow
            os.dup2(f.fileno(), 1)
            os.dup2(f.fileno(), 2)
    print(
        f"==== {job.name}: started {time.strftime('%Y-%m-%d %H:%M:%S')}, process {os.getpid()}, "
        f"{torch.get_num_threads()} threads, CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', '')}",
        flush=True,
    )
    try:
        return True, job.fn(*job.args)
    except Exception as error:  # reported by the caller; a bug's traceback stays in the log
        if user_error(error) is not None:
            print(f"ERROR: {user_error(error)}", flush=True)
        else:
            traceback.print_exc()
        return False, _describe(error)
    finally:
        sys.stdout.flush()
        sys.stderr.flush()


class JobPool:
    """The worker processes of :func:`run_jobs`, started on entering the context so that their start-up (a fresh
    interpreter importing torch, MONAI and the ``preload`` modules) overlaps the caller's own work, e.g. the teacher
    that ``compare`` trains before the runs. With ``workers <= 1`` nothing is started and :meth:`run` runs the jobs
    in this process.

    Args:
        workers: worker processes.
        threads: intra-op threads per worker (default: :func:`threads_per_job`); with ``workers=1``, as the caller
            has it unless given.
        gpus: GPUs to spread the workers over (see :func:`visible_gpus`).
        preload: modules each worker imports as it starts.
    """

    def __init__(
        self, workers: int = 1, threads: int | None = None, gpus: Sequence[str] = (), preload: Sequence[str] = ()
    ) -> None:
        self.workers, self.threads, self.gpus, self.preload = workers, threads, list(gpus), list(preload)
        self._pool: cf.ProcessPoolExecutor | None = None

    def __enter__(self) -> JobPool:
        if self.workers > 1:
            context = mp.get_context("spawn")
            slots = context.SimpleQueue()
            for slot in range(self.workers):
                slots.put(slot)
            init = (self.threads or threads_per_job(self.workers), slots, self.gpus, self.preload)
            self._pool = cf.ProcessPoolExecutor(
                self.workers, mp_context=context, initializer=_init_worker, initargs=init
            )
            for _ in range(self.workers):  # one process is spawned per task submitted while none is idle
                self._pool.submit(os.getpid)
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=exc[0] is None, cancel_futures=True)
            self._pool = None

    def start(
        self, jobs: Sequence[Job], bar: Any = None, held: Collection[Hashable] = (), reserve: int = 0
    ) -> Schedule:
        """Start running ``jobs`` in the workers, in the background, and return at once (see :class:`Schedule`): the
        caller may do other work meanwhile, e.g. train what the ``held`` jobs (by key) need, then
        :meth:`Schedule.release` them. While jobs are held, ``reserve`` workers' worth of the machine is left to the
        caller. Needs ``workers > 1``."""
        if self._pool is None:
            raise RuntimeError("JobPool.start needs workers > 1 and the pool entered (with JobPool(...) as pool).")
        return Schedule(self._pool, self.workers, jobs, bar, held, reserve)

    def run(self, jobs: Sequence[Job], bar: Any = None) -> dict[Hashable, Any]:
        """Run ``jobs`` (see the module docstring) and return each one's result by key; ``bar`` (a tqdm bar)
        advances as jobs finish. Raises :class:`JobsFailed` when a job run in a worker fails."""
        if self._pool is None:
            return _run_here(jobs, self.threads, bar)
        return self.start(jobs, bar).wait()


class Schedule:
    """Jobs a :class:`JobPool` runs in the background (:meth:`JobPool.start`), from a thread of the caller's process.

    Jobs start in their order as workers come free, at most one per worker. The ``held`` ones (by key) wait for
    :meth:`release`; until then at most ``workers - reserve`` jobs run at once, so that the caller's own work keeps
    ``reserve`` workers' share of the machine. A failed job stops new starts (as :meth:`stop` does): the running
    jobs finish, the others are reported as not started.
    """

    POLL_S = 0.2  # how often a waiting schedule looks at release() and stop()

    def __init__(
        self,
        pool: cf.ProcessPoolExecutor,
        workers: int,
        jobs: Sequence[Job],
        bar: Any = None,
        held: Collection[Hashable] = (),
        reserve: int = 0,
    ) -> None:
        self._pool, self._workers, self._jobs, self._bar = pool, workers, list(jobs), bar
        self._held, self._reserve = set(held), max(0, min(reserve, workers - 1))
        self._released, self._stopped = threading.Event(), threading.Event()
        if not self._held:
            self._released.set()
        self._results: dict[Hashable, Any] = {}
        self._failures: dict[str, str] = {}
        self._cancelled: list[str] = []
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._schedule, name="medkd-jobs", daemon=True)
        self._thread.start()

    def release(self) -> None:
        """Let the held jobs start, and use every worker."""
        self._released.set()

    def stop(self) -> None:
        """Start no more jobs and wait for the running ones to finish."""
        self._stopped.set()
        self._thread.join()

    def wait(self) -> dict[Hashable, Any]:
        """Release the held jobs, wait for every job and return each one's result by key; raises
        :class:`JobsFailed` naming the failed jobs, after the running ones finish."""
        self.release()
        self._thread.join()
        if self._error is not None:
            raise self._error
        if self._failures:  # in the jobs' order
            failures = {job.name: self._failures[job.name] for job in self._jobs if job.name in self._failures}
            logs = {job.name: job.log for job in self._jobs if job.log}
            raise JobsFailed(failures, self._cancelled, len(self._results), logs)
        return dict(self._results)

    def _startable(self, queue: list[Job]) -> list[Job]:
        released = self._released.is_set()
        return [job for job in queue if released or job.key not in self._held]

    def _schedule(self) -> None:
        queue, futures, pending = list(self._jobs), {}, set()
        try:
            while True:
                limit = self._workers if self._released.is_set() else self._workers - self._reserve
                if not (self._failures or self._stopped.is_set()):
                    for job in self._startable(queue)[: max(0, limit - len(pending))]:
                        queue.remove(job)
                        future = self._pool.submit(_run_in_worker, job)
                        futures[future] = job
                        pending.add(future)
                if not pending:
                    if not queue or self._failures or self._stopped.is_set():
                        break
                    self._released.wait(self.POLL_S)  # only held jobs are left
                    continue
                done, pending = cf.wait(pending, timeout=self.POLL_S, return_when=cf.FIRST_COMPLETED)
                for future in done:
                    self._collect(futures[future], future)
        except BaseException as error:  # a bug of the scheduler itself: raised by wait()
            self._error = error
        self._cancelled = [job.name for job in queue]

    def _collect(self, job: Job, future: cf.Future) -> None:
        try:
            ok, value = future.result()
        except BrokenProcessPool:  # a worker was killed (out of memory?) or crashed: the pool is lost
            ok, value = False, "its worker process died (killed, e.g. out of memory, or crashed)"
        except BaseException as error:  # e.g. a result that cannot be sent back, or Ctrl-C in the worker
            ok, value = False, _describe(error)
        if ok:
            self._results[job.key] = value
        else:
            self._failures[job.name] = value
        if self._bar is not None:
            self._bar.set_postfix_str(f"{job.name} {'done' if ok else 'FAILED'}")
            self._bar.update()


def _run_here(jobs: Sequence[Job], threads: int | None, bar: Any) -> dict[Hashable, Any]:
    """The jobs one after another in this process (``threads`` intra-op threads if given), errors propagating."""
    previous = torch.get_num_threads()
    results = {}
    try:
        if threads:
            torch.set_num_threads(threads)
        for job in jobs:
            if bar is not None:
                bar.set_postfix_str(job.name)
            results[job.key] = job.fn(*job.args)
            if bar is not None:
                bar.update()
    finally:
        torch.set_num_threads(previous)
    return results


def run_jobs(
    jobs: Sequence[Job], workers: int = 1, threads: int | None = None, gpus: Sequence[str] = (), bar: Any = None
) -> dict[Hashable, Any]:
    """Run ``jobs`` in a :class:`JobPool` of ``workers`` processes started for them (see the module docstring) and
    return each one's result by key."""
    with JobPool(workers, threads, gpus) as pool:
        return pool.run(jobs, bar)
