"""``index build`` on Ray: Ray Data batch inference over the catalog's images.

A dataset of BuildTasks → ``map_batches`` over a pool of actors that each load the encoder once
(``MakerSpec.maker``) and run the very per-item function of a local build (``edge_retrieval.catalog.build.make_entry``) →
ItemResults streamed back to the driver, which alone writes the generation (``edge_retrieval.catalog.build.build_index`` →
``write_index``: fsync, rename, swap). A worker that dies is restarted by Ray and its batch retried; a driver
that dies writes nothing, so the live generation stays as it was.

On a cluster, every node needs this project's dependencies (``pip install '.[scale]'``), and the catalog folder
and the model bundle at the same paths as on the driver (NFS, or a copy); the ``edge_retrieval``
package itself travels with the job (Ray ``py_modules``). docs/scale.md.
"""
from __future__ import annotations

import logging
import pickle
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import ray
import ray.data

import edge_retrieval
from edge_retrieval.catalog.build import BuildTask, ItemResult, MakerSpec, make_entry

log = logging.getLogger(__name__)


def job_runtime_env() -> dict:
    """The Ray job's runtime_env: the ``edge_retrieval`` package (this checkout's or the installed one) travels to the workers
    (Ray accepts local folders only for the whole job, at ``ray.init``: a driver that joins Ray itself
    passes this)."""
    return {"py_modules": [str(Path(edge_retrieval.__file__).resolve().parent)]}


class ItemActor:
    """One Ray actor: an encoder loaded once, then ``make_entry`` over batches of pickled BuildTasks."""

    def __init__(self, spec: MakerSpec):
        """Load the model (once per actor)."""
        self.maker = spec.maker()

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """A batch {"task": pickled BuildTasks} → {"result": pickled ItemResults}: the items carry arrays of
        several shapes (vectors, ORB keypoints, a JPEG), which Arrow columns would not hold without a schema."""
        out = [pickle.dumps(make_entry(self.maker, pickle.loads(blob)), protocol=pickle.HIGHEST_PROTOCOL)
               for blob in batch["task"]]
        return {"result": np.array(out, dtype=object)}


class RayRunner:
    """Runs BuildTasks on Ray actors (a ``edge_retrieval.catalog.build.Runner``). ``address`` None starts a local Ray on this
    machine (or uses the one this process already joined); else 'auto', 'HOST:6379' or 'ray://HOST:10001'."""

    def __init__(self, spec: MakerSpec, *, address: str | None = None, actors: int | None = None,
                 batch_size: int = 8):
        """``actors`` None: one per ``spec.num_threads`` CPUs of the cluster."""
        self.spec = spec
        self.address = address
        self.actors = actors
        self.batch_size = int(batch_size)
        self._described = f"Ray ({address or 'local'})"
        self._started = False

    def describe(self) -> str:
        """'Ray (local): 2 actors × 1 thread'."""
        return self._described

    def close(self) -> None:
        """Leave the Ray this runner joined (one it found already joined stays, e.g. a test's cluster)."""
        if self._started:
            ray.shutdown()
            self._started = False

    def _connect(self) -> int:
        if not ray.is_initialized():
            self._started = True
            ray.init(address=self.address, include_dashboard=False, log_to_driver=False,
                     logging_level=logging.WARNING, runtime_env=job_runtime_env())
        cpus = int(ray.cluster_resources().get("CPU", 1))
        return self.actors or max(1, cpus // self.spec.num_threads)

    def map(self, tasks: list[BuildTask]) -> Iterator[ItemResult]:
        """make_entry of every task on the actors; results stream back in task order."""
        if not tasks:
            return
        actors = min(self._connect(), len(tasks))
        self._described = f"Ray ({self.address or 'local'}): {actors} actors × {self.spec.num_threads} thread(s)"
        log.info("ray build: %d tasks on %d actors (%s)", len(tasks), actors, ray.get_runtime_context().gcs_address)
        ctx = ray.data.DataContext.get_current()
        ctx.enable_progress_bars = False  # the driver's tqdm shows img/s; Ray's bars would interleave with it
        ctx.execution_options.preserve_order = True  # the driver writes in row order: few results wait there
        ds = ray.data.from_items([{"task": pickle.dumps(t)} for t in tasks],
                                 override_num_blocks=max(1, min(len(tasks) // self.batch_size, 1000)))
        out = ds.map_batches(ItemActor, fn_constructor_kwargs={"spec": self.spec}, batch_size=self.batch_size,
                             batch_format="numpy", compute=ray.data.ActorPoolStrategy(size=actors),
                             num_cpus=self.spec.num_threads)
        for batch in out.iter_batches(batch_size=None, batch_format="numpy"):
            for blob in batch["result"]:
                yield pickle.loads(blob)
