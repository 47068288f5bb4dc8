"""A Hypothesis state machine over the real catalog service: enrolments, re-enrolments, removals, restarts, a store
restored from an earlier backup and a live generation corrupted in place (same size), in any order. After every
step the store and the index agree: every id the store holds enrolled is in the index with its label, every id it
holds removed is not, and the index holds the store's newest change — the invariants round three broke."""
from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import numpy as np
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule, run_state_machine_as_test

from edge_retrieval.catalog.build import ItemMaker
from edge_retrieval.catalog.service import CatalogService
from edge_retrieval.core.config import RecognitionConfig
from edge_retrieval.core.config_file import load_config
from edge_retrieval.index.holder import IndexHolder

CHEAP = RecognitionConfig(adapt=False, enrol_views=[], features=False, verify=False, decision=None,
                          accept_inliers=16, accept_score=0.74)
IDS = ("a", "b", "c", "d")
PHOTOS = ("coffee", "chelsea", "astronaut", "rocket", "moon")


def _machine(encoder, photos):
    maker = ItemMaker(encoder, CHEAP, 64)

    class StoreAndIndex(RuleBasedStateMachine):
        def __init__(self):
            super().__init__()
            self.dir = Path(tempfile.mkdtemp(prefix="store-props-"))
            (self.dir / "config.yaml").write_text(
                f"catalog:\n  store: {self.dir / 'catalog.sqlite'}\n  enrolled_dir: {self.dir / 'enrolled'}\n"
                f"index:\n  path: {self.dir / 'index'}\n  n_trees: 1\n")
            self.config = load_config(self.dir / "config.yaml")
            self.backup: Path | None = None
            self.service = self._open()

        def _open(self) -> CatalogService:
            holder = IndexHolder(self.config.index, expected_bundle_sha256=encoder.sha256, create_empty=True,
                                 dim=encoder.dim, recover=True)
            service = CatalogService(self.config.catalog, holder, maker)
            service.apply()
            return service

        @rule(item=st.sampled_from(IDS), photo=st.sampled_from(PHOTOS), label=st.sampled_from(("x", "y")))
        def enrol(self, item, photo, label):
            self.service.enrol(photos[photo], item, f"{label}-{item}", replace=True)
            self.service.apply()

        @rule(item=st.sampled_from(IDS))
        def remove(self, item):
            self.service.remove(item)
            self.service.apply()

        @rule()
        def restart(self):
            self.service.stop()
            self.service = self._open()

        @rule()
        def back_up(self):
            self.service.stop()  # closed: the WAL is checkpointed into the file
            self.backup = self.dir / "backup.sqlite"
            shutil.copy(self.config.catalog.store, self.backup)
            self.service = self._open()

        @precondition(lambda self: self.backup is not None)
        @rule()
        def restore_the_backup(self):
            self.service.stop()
            store = Path(self.config.catalog.store)
            for extra in (Path(f"{store}-wal"), Path(f"{store}-shm")):
                extra.unlink(missing_ok=True)
            shutil.copy(self.backup, store)
            self.service = self._open()

        @rule(node=st.integers(0, 10_000))
        def corrupt_the_live_generation(self, node):
            gen = self.service.holder.current().path
            self.service.stop()
            nodes = np.memmap(gen / "vectors.ann", dtype="<i4", mode="r+")
            if len(nodes):
                nodes[node % len(nodes)] = -7  # a count or a child index out of range, same size
                nodes.flush()
            del nodes
            self.service = self._open()

        @invariant()
        def the_store_and_the_index_agree(self):
            index = self.service.holder.current()
            labels = {it.id: it.label for it in index.items}
            for item in IDS:
                row = self.service.store.get(item)
                if row is not None and not row.removed:
                    assert labels.get(item) == row.label, (item, row, labels)
                if row is not None and row.removed:
                    assert item not in labels, (item, labels)
            assert self.service.applied_seq() == self.service.store.seq()

        def teardown(self):
            self.service.stop()
            shutil.rmtree(self.dir, ignore_errors=True)

    return StoreAndIndex


def test_no_sequence_of_changes_restarts_restores_and_corruption_breaks_the_store_index_agreement(encoder, photos):
    run_state_machine_as_test(_machine(encoder, photos), settings=settings(
        max_examples=100, stateful_step_count=12, deadline=None, derandomize=True,
        suppress_health_check=list(HealthCheck)))
