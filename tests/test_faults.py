"""The fault suite: a generated corpus of malformed instances (tests/faults.py), sent
over real associations as raw bytes with good runs in between.

Every bad instance gets a documented DIMSE status, or is stored and ends as a
failed job with a reason, an unroutable or unrouted run; no input stops the
processing, loops, or keeps the node from restarting; every good run sent between
the bad ones is processed.
"""

from __future__ import annotations

import collections
import warnings
from pathlib import Path
from typing import Any

import pytest
from pynetdicom import _config

from tests.conftest import corpus_seed, wait_for
from tests.faults import CATEGORIES, corpus, fuzzer_ae

pytestmark = pytest.mark.slow

# README "Behaviour on bad input": what a C-STORE may answer.
DOCUMENTED = {0x0000, 0x0122, 0xA900, 0xC000, 0xC001, 0xC002, 0xC122}


class Sender:
    """One association per instance (as a modality would send a run), the raw bytes
    sent as they are; an association lost before the answer is retried once."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.ae = fuzzer_ae()
        self.ae.dimse_timeout = self.ae.network_timeout = 180
        self.retries = 0

    def _send(self, path: Path) -> int | None:
        assoc = self.ae.associate("127.0.0.1", self.port, ae_title="ANGIO_NODE")
        assert assoc.is_established, "the node refused an association"
        try:
            status = assoc.send_c_store(path)
        finally:
            if assoc.is_established:
                assoc.release()
        return int(status.Status) if status and "Status" in status else None

    def send(self, path: Path) -> int | None:
        status = self._send(path)
        if status is None:
            self.retries += 1
            status = self._send(path)
        return status


def _good_runs(directory: Path, count: int) -> list[Path]:
    from training.phantoms import dsa

    paths = []
    for seed in range(count):
        written = dsa.generate(9000 + seed, size=128, frames=16).write(directory / str(seed))
        paths.append(next(p for p in written if p.name == "dsa.dcm"))
    return paths


def _settled(node: Any) -> bool:
    busy = node.db.query("SELECT COUNT(*) n FROM runs WHERE state IN ('receiving', 'complete')")
    return busy[0]["n"] == 0 and node.db.unsettled_jobs() == 0


def test_malformed_corpus_never_stops_the_node(
    make_node: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(_config, "STORE_SEND_CHUNKED_DATASET", True)
    warnings.simplefilter("ignore")  # pydicom warns about every invalid value it reads
    seed = corpus_seed(16)
    cases = corpus(seed=seed)
    assert len(cases) >= 300 and {c.category for c in cases} == set(CATEGORIES)
    good = _good_runs(tmp_path / "good", 1 + len(cases) // 30)
    node = make_node(
        completion={"quiet_period_s": 0.5},
        workers={"concurrency": 2, "max_attempts": 2, "memory_limit_mib": 1536},
        limits={
            "max_decoded_bytes": 64 * 2**20,
            "max_inflated_bytes": 80 * 2**20,
            "max_header_bytes": 2**20,
        },
    )
    sender = Sender(node.port)
    statuses: dict[str, int | None] = {}
    by_category: dict[str, collections.Counter[int | None]] = collections.defaultdict(
        collections.Counter
    )
    good_runs: list[str] = []
    folder = tmp_path / "bad"
    folder.mkdir()
    for i, case in enumerate(cases):
        if i % 30 == 0:
            from pydicom import dcmread

            path = good[i // 30]
            assert sender.send(path) == 0x0000
            good_runs.append(str(dcmread(path, stop_before_pixels=True).SOPInstanceUID))
        path = folder / f"{i:03d}.dcm"
        path.write_bytes(case.data)
        status = sender.send(path)
        statuses[f"{i:03d} {case.category}: {case.name}"] = status
        by_category[case.category][status] += 1
    undocumented = {k: v for k, v in statuses.items() if v not in DOCUMENTED}
    assert not undocumented, f"statuses not in the README's table: {undocumented}"
    print({c: {hex(k or 0): n for k, n in v.items()} for c, v in by_category.items()})
    assert sender.retries <= 3, f"{sender.retries} associations lost while sending"

    wait_for(lambda: _settled(node), 900, interval=1.0, what="every run and job to settle")
    # the processing never stopped: every good run sent between the bad ones is done
    for run_id in good_runs:
        jobs = node.db.query("SELECT pipeline, state, error FROM jobs WHERE run_id=?", (run_id,))
        assert {j["pipeline"] for j in jobs} == {"minip", "dsa_av", "dsa_perfusion"}
        assert all(j["state"] == "done" for j in jobs), [dict(j) for j in jobs]
    # every failure says why, and nothing looped
    jobs = node.db.query("SELECT id, pipeline, state, attempts, error FROM jobs")
    assert all(j["attempts"] <= 2 for j in jobs)
    failed = [dict(j) for j in jobs if j["state"] == "failed"]
    assert all(j["error"] for j in failed)
    internal = [j for j in failed if "internal error" in j["error"]]
    assert not internal, f"defects met on malformed input: {internal}"
    runs = node.db.query("SELECT state, reason FROM runs WHERE state IN ('unroutable', 'unrouted')")
    assert all(r["reason"] for r in runs)
    assert all(t.is_alive() for t in node.workers.threads) and node.router.threads[0].is_alive()
    crashed = [j for j in failed if "crashed" in j["error"]]
    if seed == 16:  # this corpus holds an RLE case whose decoder panics
        assert crashed, "the RLE case's decoder panic should have ended its job, not the node"

    # and the node restarts on this storage, and still processes
    node.stop()
    again = make_node(completion={"quiet_period_s": 0.5}, workers={"concurrency": 1})
    sender = Sender(again.port)
    extra = _good_runs(tmp_path / "after", 1)[0]
    assert sender.send(extra) == 0x0000
    wait_for(
        lambda: len(again.db.query("SELECT 1 FROM jobs WHERE state='done'")) >= 3 * (len(good) + 1),
        300,
        what="a good run after the restart",
    )
