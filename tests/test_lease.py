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


def stale(out: str, run_id: str = "old-run") -> None:
    """A lease left by a killed run on another host, more than a second old on the store's clock."""
    _aged(out, json.dumps({"run_id": run_id, "host": "gone-host", "pid": 1}).encode(), older_than_s=1.0)


@pytest.mark.timeout(60)
def test_second_run_is_refused_naming_the_holder_then_may_take_it_after_release(out_uri):
    a = lease.Lease(out_uri, "run-a", ttl_s=60).acquire()
    try:
        with pytest.raises(lease.LeaseHeld) as e:
            lease.Lease(out_uri, "run-b", ttl_s=60).acquire()
        assert "run run-a on" in str(e.value) and "goes stale in" in str(e.value)
        assert lease.read_holder(out_uri)["run_id"] == "run-a"
    finally:
        a.release()
    assert lease.read_holder(out_uri) is None
    with lease.Lease(out_uri, "run-b", ttl_s=60):
        assert lease.read_holder(out_uri)["run_id"] == "run-b"


@pytest.mark.timeout(60)
def test_heartbeat_keeps_a_live_lease_and_a_stale_one_is_taken_over_by_one_taker(out_uri):
    live = lease.Lease(out_uri, "live", ttl_s=1.0, heartbeat_s=0.1).acquire()
    time.sleep(2.5)  # longer than the TTL: only the heartbeat keeps it
    with pytest.raises(lease.LeaseHeld, match="run live"):
        lease.Lease(out_uri, "late", ttl_s=1.0).acquire()
    live.release()

    stale(out_uri)
    winners, losers = [], []
    barrier = threading.Barrier(4)

    def take(i):
        barrier.wait()
        try:
            winners.append(lease.Lease(out_uri, f"taker-{i}", ttl_s=1.0, heartbeat_s=3600).acquire())
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
    # The holder's heartbeat never fires (a stall); a taker finds its 1 s lease stale.
    a = lease.Lease(out_uri, "stalled", ttl_s=1.0, heartbeat_s=3600).acquire()
    time.sleep(2.3)
    b = lease.Lease(out_uri, "next", ttl_s=1.0, heartbeat_s=3600).acquire()
    try:
        a.renew()  # what its heartbeat does when it wakes up
        with pytest.raises(lease.LeaseLost, match="taken over by run next"):
            a.check()
        a.release()  # must not delete the new holder's lease
        assert lease.read_holder(out_uri)["run_id"] == "next"
    finally:
        b.release()


# ---------------------------------------------------------------------------------------------
# Issue 20 item 6: a lease decided on the store's clock, fenced writes, dead holders, breaking by hand


def _aged(out: str, body: bytes, older_than_s: float) -> None:
    """A lease object the store wrote ``older_than_s`` ago (locally backdated; on S3 by waiting)."""
    uri = storage.join(out, lease.LOCK)
    storage.write_bytes(uri, body)
    if storage.is_s3(out):
        time.sleep(older_than_s + 1.1)  # S3's LastModified and Date have one-second resolution
    else:
        import os

        t = time.time() - older_than_s - 1
        os.utime(uri.removeprefix("file://"), (t, t))


@pytest.mark.timeout(60)
def test_a_taker_whose_clock_runs_ahead_cannot_take_a_live_lease(s3_bucket, monkeypatch):
    out = f"s3://{s3_bucket}/scores"
    holder = lease.Lease(out, "holder", ttl_s=60).acquire()
    try:
        real = time.time
        monkeypatch.setattr(time, "time", lambda: real() + 3600)  # this host's clock is an hour fast
        with pytest.raises(lease.LeaseHeld, match="run holder on"):
            lease.Lease(out, "fast-clock", ttl_s=60).acquire()
        monkeypatch.setattr(time, "time", real)
        assert lease.read_holder(out)["run_id"] == "holder"
    finally:
        holder.release()


@pytest.mark.timeout(60)
def test_renewals_failing_for_half_the_ttl_stop_the_run(out_uri, monkeypatch):
    a = lease.Lease(out_uri, "flaky-store", ttl_s=1.0, heartbeat_s=0.05).acquire()
    try:
        def down(*args, **kwargs):
            raise ConnectionError("store unreachable")

        monkeypatch.setattr(storage, "replace_if", down)
        a.check()  # just renewed: fine
        time.sleep(0.7)
        with pytest.raises(lease.LeaseLost, match="not renewed for"):
            a.check()
    finally:
        monkeypatch.undo()
        a.release()


@pytest.mark.timeout(60)
def test_a_dead_holder_on_this_host_is_taken_over_at_once(tmp_path):
    import socket
    import subprocess

    out = str(tmp_path / "out")
    gone = subprocess.Popen(["true"])
    gone.wait()
    storage.write_text(storage.join(out, lease.LOCK), json.dumps(
        {"run_id": "killed", "host": socket.gethostname(), "boot_id": lease._boot_id(), "pid": gone.pid,
         "pid_started": "1", "ttl_s": 120}))
    with lease.Lease(out, "rerun", ttl_s=120) as b:  # the lease is seconds old: only its holder is gone
        assert b.took_over["run_id"] == "killed" and b.took_over["dead"] is True
    # A live holder on this host (this very process) is not "dead": the re-run is refused.
    with lease.Lease(out, "alive", ttl_s=120):
        with pytest.raises(lease.LeaseHeld, match=r"goes stale in \d+ s .*steel lease"):
            lease.Lease(out, "second", ttl_s=120).acquire()


@pytest.mark.timeout(60)
def test_a_fence_retries_store_faults_and_knows_its_own_write_whose_answer_was_lost(out_uri, monkeypatch):
    a = lease.Lease(out_uri, "run-a", ttl_s=60, heartbeat_s=3600, retries=3, backoff_s=0.0).acquire()
    real = storage.replace_if
    faults = ["refused", "landed"]

    def flaky(uri, data, tag, endpoint=None):
        fault = faults.pop(0) if faults else None
        if fault == "refused":  # the store answered 503: nothing written
            raise ConnectionError("SlowDown")
        new = real(uri, data, tag, endpoint)
        if fault == "landed":  # written, but the answer never came back
            raise ConnectionError("connection reset by peer")
        return new

    monkeypatch.setattr(storage, "replace_if", flaky)
    try:
        a.fence()  # both faults absorbed: still the holder
        assert not faults and a.lost is None and lease.read_holder(out_uri)["nonce"] == a._nonce
        a.fence()  # and the tag it adopted is the lease's real one
        monkeypatch.setattr(storage, "replace_if", lambda *args, **kw: (_ for _ in ()).throw(ConnectionError("down")))
        with pytest.raises(lease.LeaseLost, match="could not be confirmed before a write"):
            a.fence()  # a store that never answers: nothing may be committed
    finally:
        monkeypatch.setattr(storage, "replace_if", real)
        a.release()


@pytest.mark.timeout(60)
def test_a_taker_with_a_shorter_ttl_waits_out_the_holders(out_uri):
    a = lease.Lease(out_uri, "long-ttl", ttl_s=60.0, heartbeat_s=3600).acquire()
    try:
        time.sleep(2.3)
        with pytest.raises(lease.LeaseHeld, match="goes stale in 5[0-9] s"):
            lease.Lease(out_uri, "impatient", ttl_s=1.0).acquire()
        a.fence()  # still the holder
    finally:
        a.release()


@pytest.mark.timeout(60)
def test_a_run_that_lost_its_lease_is_fenced_off(out_uri):
    a = lease.Lease(out_uri, "stalled", ttl_s=1.0, heartbeat_s=3600).acquire()  # no heartbeat: a stall
    time.sleep(2.3)
    b = lease.Lease(out_uri, "next", ttl_s=1.0, heartbeat_s=3600).acquire()
    try:
        assert b.took_over["run_id"] == "stalled"
        with pytest.raises(lease.LeaseLost, match=r"not renewed for \d s \(over 50% of its 1 s TTL\)"):
            a.fence()  # what the stalled run does before its next shard: it stops, having been silent
        b2 = lease.Lease(out_uri, "third", ttl_s=60.0)
        with pytest.raises(lease.LeaseHeld):  # and a live holder is not taken over
            b2.acquire()
        a.release()  # must not delete the new holder's lease
        assert lease.read_holder(out_uri)["run_id"] == "next"
        b.fence()  # the holder passes
    finally:
        b.release()


@pytest.mark.timeout(60)
def test_break_refuses_a_live_lease_and_removes_a_stale_or_unreadable_one(out_uri):
    live = lease.Lease(out_uri, "live", ttl_s=60).acquire()
    try:
        with pytest.raises(lease.LeaseHeld, match="it is alive; not broken"):
            lease.break_lease(out_uri)
        assert lease.status(out_uri)["holder"]["run_id"] == "live" and not lease.status(out_uri)["stale"]
    finally:
        live.release()
    _aged(out_uri, b"not json at all", older_than_s=1.0)
    st = lease.status(out_uri)
    assert st["holder"]["unreadable"] and st["age_s"] >= 1.0
    with lease.Lease(out_uri, "after-garbage", ttl_s=1.0):  # unreadable and stale: taken over, not a crash
        pass
    _aged(out_uri, json.dumps({"run_id": "old", "host": "elsewhere", "ttl_s": 1}).encode(), older_than_s=1.0)
    assert lease.break_lease(out_uri)["holder"]["run_id"] == "old" and lease.read_holder(out_uri) is None


@pytest.mark.timeout(60)
def test_lease_command_shows_and_breaks(tmp_path, capsys):
    from steel.cli import main

    out = str(tmp_path / "out")
    assert main(["lease", out]) == 0
    assert "no lease: no run is scoring into it" in capsys.readouterr().out
    live = lease.Lease(out, "live-run", ttl_s=60).acquire()
    try:
        assert main(["lease", out, "--json"]) == 0
        shown = json.loads(capsys.readouterr().out)
        assert (shown["held"], shown["holder"]["run_id"], shown["stale"], shown["dead"]) == (True, "live-run", False, False)
        assert main(["lease", out, "--break"]) == 3
        assert "not broken" in capsys.readouterr().err and lease.read_holder(out)["run_id"] == "live-run"
    finally:
        live.release()
    _aged(out, json.dumps({"run_id": "left-behind", "host": "gone-host", "pid": 1, "ttl_s": 1}).encode(), 1.0)
    assert main(["lease", out]) == 0
    assert "run left-behind on gone-host (pid 1)" in capsys.readouterr().out
    assert main(["lease", out, "--break"]) == 0
    assert "broke" in capsys.readouterr().out and lease.read_holder(out) is None


def test_score_exits_3_when_the_run_loses_its_lease(tmp_path, monkeypatch, capsys):
    from steel import api
    from steel.cli import main

    def lost(*a, **k):
        raise lease.LeaseLost("lease x/_LOCK was taken over by run other on host (pid 9)")

    monkeypatch.setattr(api, "score", lost)
    assert main(["score", "--bundle", str(tmp_path), "--images", str(tmp_path), "--out", str(tmp_path / "o"),
                 "--json"]) == 3
    captured = capsys.readouterr()
    assert json.loads(captured.out)["status"] == "lease lost" and "stopped: lease x/_LOCK was taken over" in captured.err

