"""steel.score.lease: one writer per output, locally (O_EXCL + flock) and on S3 (conditional PUTs on the moto server)."""

from __future__ import annotations

import json
import threading
import time

import pytest

from steel.core import storage
from steel.score import lease


@pytest.fixture(params=["local", "s3"])
def out_uri(request, tmp_path):
    if request.param == "local":
        return str(tmp_path / "out")
    bucket = request.getfixturevalue("s3_bucket")
    return f"s3://{bucket}/scores"


def stale(out: str, run_id: str = "old-run", age_s: float = 3600) -> None:
    """A lease left by a killed run: its heartbeat is ``age_s`` old."""
    storage.write_text(storage.join(out, lease.LOCK), json.dumps(
        {"run_id": run_id, "host": "gone-host", "pid": 1, "heartbeat": time.time() - age_s}))


@pytest.mark.timeout(60)
def test_second_run_is_refused_naming_the_holder_then_may_take_it_after_release(out_uri):
    a = lease.Lease(out_uri, "run-a", ttl_s=60).acquire()
    try:
        with pytest.raises(lease.LeaseHeld) as e:
            lease.Lease(out_uri, "run-b", ttl_s=60).acquire()
        assert "run run-a on" in str(e.value) and "heartbeat" in str(e.value)
        assert lease.read_holder(out_uri)["run_id"] == "run-a"
    finally:
        a.release()
    assert lease.read_holder(out_uri) is None
    with lease.Lease(out_uri, "run-b", ttl_s=60):
        assert lease.read_holder(out_uri)["run_id"] == "run-b"


@pytest.mark.timeout(60)
def test_heartbeat_keeps_a_live_lease_and_a_stale_one_is_taken_over_by_one_taker(out_uri):
    live = lease.Lease(out_uri, "live", ttl_s=1.0, heartbeat_s=0.1).acquire()
    time.sleep(1.5)  # longer than the TTL: only the heartbeat keeps it
    with pytest.raises(lease.LeaseHeld, match="run live"):
        lease.Lease(out_uri, "late", ttl_s=1.0).acquire()
    live.release()

    stale(out_uri)
    winners, losers = [], []
    barrier = threading.Barrier(4)

    def take(i):
        barrier.wait()
        try:
            winners.append(lease.Lease(out_uri, f"taker-{i}", ttl_s=60).acquire())
        except lease.LeaseHeld as e:
            losers.append(str(e))

    threads = [threading.Thread(target=take, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    try:
        assert len(winners) == 1 and len(losers) == 3, (winners, losers)
        assert winners[0].took_over["run_id"] == "old-run"
        assert lease.read_holder(out_uri)["run_id"] == winners[0].run_id
    finally:
        for w in winners:
            w.release()


@pytest.mark.timeout(60)
def test_a_stalled_holder_learns_it_lost_the_lease(out_uri):
    a = lease.Lease(out_uri, "stalled", ttl_s=0.3, heartbeat_s=3600).acquire()  # heartbeat never fires
    time.sleep(0.5)
    b = lease.Lease(out_uri, "next", ttl_s=0.3, heartbeat_s=3600).acquire()
    try:
        a.check()  # nothing noticed yet
        a.renew()
        with pytest.raises(lease.LeaseLost, match="taken over by run next"):
            a.check()
        a.release()  # must not delete the new holder's lease
        assert lease.read_holder(out_uri)["run_id"] == "next"
    finally:
        b.release()
