"""The local build on every core: worker processes that each load the encoder once (``MakerSpec.maker``) and
run the same per-item function as an in-process or a Ray build (``catalog.make_entry``); the driver
(``catalog.build_index``) collects the results and alone writes the generation.

Processes, not threads: ORB, decoding and thumbnails hold the GIL for much of their time, and one interpreter
per process with few threads each scales better than one interpreter with many (docs/scale.md). Workers are
spawned, not forked: a fork of a process whose runtime already started threads can deadlock.
"""
from __future__ import annotations

import concurrent.futures
import importlib
import multiprocessing
import os
from collections.abc import Iterator

from edge_retrieval.catalog.build import (
    BuildReport,
    BuildTask,
    ItemMaker,
    ItemResult,
    MakerSpec,
    make_entries,
    make_entry,
)
from edge_retrieval.core.config import BuildConfig
from edge_retrieval.core.errors import CatalogIndexError, ConfigError

_maker: ItemMaker | None = None  # one per worker process, made by _init
MIN_TASKS = 32  # a smaller build (the demo's catalog) runs in process: spawning workers costs seconds
CHUNK = 4  # tasks per message: amortises the pickling without starving a worker at the end


def _init(spec: MakerSpec) -> None:
    global _maker
    _maker = spec.maker()


def _work(task: BuildTask) -> ItemResult:
    return make_entry(_maker, task)


def runner_for(config: BuildConfig, maker: ItemMaker, *, workers: int | None = None, ray: str | None = None):
    """Who runs the per-item work of a build (``index build``): None (in process), local worker processes, or
    Ray actors. ``workers`` / ``ray`` are the command line's (``ray``: an address, '' = a local Ray); None =
    as ``config`` says. Raises ConfigError when Ray is asked for and not installed."""
    spec = maker.spec(config.threads_per_worker)
    if ray is not None or (config.ray and workers is None):
        try:  # by name: only a Ray build imports ray_build (and Ray); the device never does
            ray_build = importlib.import_module("edge_retrieval.catalog.ray_build")
        except ImportError as e:
            raise ConfigError(f"a Ray build needs Ray ({e}): pip install '.[scale]'") from None
        return ray_build.RayRunner(spec, address=(ray or None) if ray is not None else config.ray_address,
                                   actors=config.ray_actors, batch_size=config.ray_batch_size)
    n = workers or config.workers or max(1, default_workers() // config.threads_per_worker)
    return ProcessRunner(spec, n, local=maker) if n > 1 else None


def report_text(rep: BuildReport) -> str:
    """What a build did, for the command line: generation, item pass with its img/s and who ran it, the
    adaptation views on their own line, the projection, the skipped files."""
    lines = [f"{rep.generation} in {rep.seconds:.1f} s; skipped {len(rep.skipped)}, ignored {len(rep.ignored)}",
             f"  items: {rep.indexed + len(rep.skipped)} images in {rep.items_seconds:.1f} s = "
             f"{rep.items_per_s:.1f} img/s ({rep.workers})"]
    if rep.adapt_items:
        lines.append(f"  adaptation views: {rep.adapt_items} items in {rep.adapt_seconds:.1f} s (a fixed cost: at "
                     "most recognition.adapt_max_items items)")
    if rep.adapted:
        lines.append(f"catalog-adapted projection: {rep.adapted['in_dim']} → {rep.adapted['dim']} dims, fitted on "
                     f"{rep.adapted['fit_items']} items × {rep.adapted['views_per_item']} views")
    lines += [f"  skipped {rel}: {why}" for rel, why in rep.skipped]
    lines += [f"  ignored {rel}: {why}" for rel, why in rep.ignored]
    if rep.hidden:
        lines.append(f"  {rep.hidden} hidden files (names starting with '.') passed over")
    return "\n".join(lines)


def default_workers() -> int:
    """One worker per core this process may use."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


class ProcessRunner:
    """Runs BuildTasks on ``workers`` spawned processes, each with its own encoder of ``spec.num_threads``
    threads. A worker that dies (killed, out of memory) fails the build with CatalogIndexError before anything
    is written: the live generation stays as it was."""

    def __init__(self, spec: MakerSpec, workers: int, *, local: ItemMaker | None = None,
                 min_tasks: int = MIN_TASKS):
        """``workers`` ≥ 1 processes (``default_workers()``: one per core). With ``local`` (the driver's own
        ItemMaker), fewer than ``min_tasks`` tasks run in process: starting workers would cost more."""
        if workers < 1:
            raise CatalogIndexError(f"a local build needs at least 1 worker, got {workers}")
        self.spec = spec
        self.workers = int(workers)
        self.local = local
        self.min_tasks = min_tasks
        self._pool: concurrent.futures.ProcessPoolExecutor | None = None

    def describe(self) -> str:
        """'2 worker processes × 1 thread'."""
        return (f"{self.workers} worker process{'es' * (self.workers > 1)} × {self.spec.num_threads} "
                f"thread{'s' * (self.spec.num_threads > 1)}")

    def map(self, tasks: list[BuildTask]) -> Iterator[ItemResult]:
        """make_entry of every task, in task order (results stream back while later tasks run). The workers
        are started on the first call and kept for the next one (the adaptation pass) until :meth:`close`."""
        if not tasks:
            return
        if self.local is not None and len(tasks) < self.min_tasks:
            yield from make_entries(self.local, tasks)
            return
        if self._pool is None:
            self._pool = concurrent.futures.ProcessPoolExecutor(
                self.workers, mp_context=multiprocessing.get_context("spawn"), initializer=_init,
                initargs=(self.spec,))
        try:
            yield from self._pool.map(_work, tasks, chunksize=CHUNK)
        except concurrent.futures.process.BrokenProcessPool as e:
            self.close()
            raise CatalogIndexError(f"a build worker process died ({e}); the index was not changed") from None

    def close(self) -> None:
        """Stop the workers."""
        pool, self._pool = self._pool, None
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)
