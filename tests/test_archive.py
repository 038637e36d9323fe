"""Continuous archival, point-in-time restore, S3 (a real moto endpoint) and the drill."""

import os
import socket
import time

import numpy as np
import pytest

import stemedb
from stemedb.backup import catalog
from stemedb.backup.archiver import Archiver
from stemedb.backup.copy import backup
from stemedb.backup.drill import run_drill
from stemedb.backup.objects import open_objects
from stemedb.backup.restore import restore
from stemedb.engine import database
from stemedb.errors import ConfigError
from stemedb.server.config import ServerConfig

SEGMENT = 1 << 16
SIGNER = stemedb.Signer.from_seed(b"c" * 32)


def batch(tag, n=20):
    return [stemedb.Assertion(f"{tag}-{i // 5}", "p", i).sign(SIGNER) for i in range(n)]


def ids_of(path):
    db = database.open(path)
    try:
        assert db.verify().ok
        return {bytes(row) for row in np.asarray(db.view.column("id"))}
    finally:
        db.close()


def now_us():
    return time.time_ns() // 1000


@pytest.fixture
def store(tmp_path):
    db = database.open(tmp_path / "data", segment_size=SEGMENT)
    yield db
    db.close()


def test_commit_clock_ends_are_the_batch_ends_in_the_files(store, tmp_path):
    archiver = Archiver(store, f"file://{tmp_path}/archive", 1.0)
    try:
        for n in range(8):
            store.put_many(batch(f"k{n}"))
        copied = archiver.round()
        assert copied is not None
        timed = [end for s in copied.manifest.segments for p in s["parts"] for end, _ in p["commits"]]
        assert len(timed) == 8
        assert timed[-1] == copied.manifest.position[1]
        assert copied.manifest.records == 160
    finally:
        archiver.close()


def test_as_of_restores_exactly_the_batches_committed_by_then(store, tmp_path):
    archive = f"file://{tmp_path}/archive"
    archiver = Archiver(store, archive, 1.0)
    try:
        groups, cuts = [], []
        for n in range(6):
            groups.append(set(store.put_many(batch(f"t{n}", 30))))
            cuts.append(now_us())          # after batch n was acknowledged, before n+1
            if n % 2:
                archiver.round()
        archiver.round()
    finally:
        archiver.close()
    for n in (0, 2, 3, 5):
        target = str(tmp_path / f"as-of-{n}")
        restored = restore([archive], target, as_of_us=cuts[n])
        expected = set().union(*groups[:n + 1])
        assert ids_of(target) == expected and restored.records == len(expected)
    empty = str(tmp_path / "before")
    assert restore([archive], empty, as_of_us=cuts[0] - 10**9).records == 0
    assert ids_of(empty) == set()


def test_as_of_across_sealed_segments_archived_in_one_round(store, tmp_path):
    """A sealed segment's footer part is no batch: a cut after it still takes the next segment."""
    archive = f"file://{tmp_path}/archive"
    archiver = Archiver(store, archive, 1.0)
    try:
        groups, cuts = [], []
        for n in range(24):
            groups.append(set(store.put_many(batch(f"g{n}", 30))))
            cuts.append(now_us())
        copied = archiver.round()
    finally:
        archiver.close()
    assert copied is not None and sum(s["sealed"] for s in copied.manifest.segments) >= 2
    # the cuts that fall right after a sealed segment's last batch, and the first and last
    sealed_last = [s["parts"][-1]["commits"][-1][1] for s in copied.manifest.segments if s["sealed"]]
    chosen = {0, 23} | {next(n for n, cut in enumerate(cuts) if cut >= t) for t in sealed_last}
    for n in sorted(chosen):
        target = str(tmp_path / f"as-of-{n}")
        restore([archive], target, as_of_us=cuts[n])
        assert ids_of(target) == set().union(*groups[:n + 1]), n


def test_a_restored_store_archives_on_incrementally_but_an_earlier_point_is_refused(store, tmp_path):
    archive = f"file://{tmp_path}/archive"
    archiver = Archiver(store, archive, 1.0)
    try:
        store.put_many(batch("r0"))
        cut = now_us()
        store.put_many(batch("r1"))
        archiver.round()
    finally:
        archiver.close()
    restore([archive], str(tmp_path / "whole"))
    restore([archive], str(tmp_path / "earlier"), as_of_us=cut)
    whole = database.open(tmp_path / "whole")
    try:
        again = Archiver(whole, archive, 1.0)
        try:
            whole.put_many(batch("r2"))
            copied = again.round()
            assert copied is not None and copied.recopied == [] and copied.manifest.records == 60
            assert copied.objects == 1          # only the new batch: the rest was already there
        finally:
            again.close()
    finally:
        whole.close()
    earlier = database.open(tmp_path / "earlier")
    try:
        late = Archiver(earlier, archive, 1.0)
        try:
            with pytest.raises(stemedb.StemeError, match="restored to an earlier point"):
                late.round()
        finally:
            late.close()
    finally:
        earlier.close()


def test_as_of_on_an_untimed_backup_never_includes_later_writes(store, tmp_path):
    dest = str(tmp_path / "dest")
    store.put_many(batch("u0"))
    before_backup = now_us()
    backup(store.path, dest)
    after_backup = now_us()
    assert restore([dest], str(tmp_path / "early"), as_of_us=before_backup - 1).records == 0
    assert restore([dest], str(tmp_path / "late"), as_of_us=after_backup).records == 20


def test_restore_from_backup_plus_archive_takes_the_longer_of_each_segment(store, tmp_path):
    dest, archive = str(tmp_path / "dest"), f"file://{tmp_path}/archive"
    for n in range(5):
        store.put_many(batch(f"x{n}"))
    backup(store.path, dest)
    archiver = Archiver(store, archive, 1.0)
    try:
        for n in range(10):
            store.put_many(batch(f"y{n}"))
        archiver.round()
    finally:
        archiver.close()
    restored = restore([dest, archive], str(tmp_path / "restored"))
    assert restored.records == 300 == len(ids_of(tmp_path / "restored"))


def test_archive_status_reports_lag_until_a_round_catches_up(store, tmp_path):
    archiver = Archiver(store, f"file://{tmp_path}/archive", 1.0)
    try:
        assert archiver.status().last_success_unix is None
        store.put_many(batch("l"))
        assert archiver.clock.oldest_after(archiver.archived) is not None
        archiver.round()
        status = archiver.status()
        assert status.lag_seconds == 0.0 and status.last_success_unix is not None
        assert status.archived_bytes > 0 and status.failures == 0
        assert archiver.round() is None        # nothing new: nothing uploaded
    finally:
        archiver.close()


def test_archive_config_keys():
    config = ServerConfig.from_dict({"archive": {"url": "s3://bucket/db1", "interval": 0.5}})
    assert (config.archive_url, config.archive_interval) == ("s3://bucket/db1", 0.5)
    assert ServerConfig.from_dict({}).archive_url is None
    with pytest.raises(ConfigError, match="archive.url"):
        ServerConfig.from_dict({"archive": {"url": "/var/archive"}})
    with pytest.raises(ConfigError, match="archive.interval"):
        ServerConfig.from_dict({"archive": {"url": "file:///a", "interval": 0}})
    with pytest.raises(ConfigError, match="archive.every"):
        ServerConfig.from_dict({"archive": {"every": 1}})


def _free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture
def s3(monkeypatch):
    from moto.server import ThreadedMotoServer

    port = _free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port)
    server.start()
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", f"http://127.0.0.1:{port}")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    import boto3

    # moto keeps one backend per process: a bucket of its own for each test
    bucket = f"stemedb-archive-{port}"
    boto3.client("s3").create_bucket(Bucket=bucket)
    yield f"s3://{bucket}/db1"
    server.stop()


def test_archive_to_s3_round_trips_and_restores(store, tmp_path, s3):
    archiver = Archiver(store, s3, 1.0)
    try:
        for n in range(12):
            store.put_many(batch(f"s{n}"))
        first = archiver.round()
        for n in range(3):
            store.put_many(batch(f"z{n}"))
        second = archiver.round()
    finally:
        archiver.close()
    assert first is not None and second is not None
    held = {s["number"]: s["length"] for s in first.manifest.segments}
    growth = [s["length"] - held.get(s["number"], 0) for s in second.manifest.segments]
    assert second.objects == sum(1 for g in growth if g) and second.bytes == sum(growth)
    assert second.bytes < first.bytes                # only the grown tail and the new segment
    objects = open_objects(s3)
    assert objects.describe(catalog.ARCHIVE) == f"{s3}/archive.json"
    assert catalog.read_manifest(objects, catalog.ARCHIVE).records == 300
    target = str(tmp_path / "restored")
    assert restore([s3], target).records == 300
    assert ids_of(target) == {bytes(r) for r in np.asarray(store.view.column("id"))}


def test_a_damaged_s3_object_is_refused_naming_it(store, tmp_path, s3):
    store.put_many(batch("d"))
    copied = backup(store.path, s3)
    objects = open_objects(s3)
    part = copied.manifest.segments[0]["parts"][0]["object"]
    data = bytearray(objects.get(part))
    data[100] ^= 0xFF
    objects.put(part, bytes(data))
    with pytest.raises(stemedb.CorruptionError, match=f"{s3}/{part}"):
        restore([s3], str(tmp_path / "restored"))
    assert not os.path.exists(tmp_path / "restored")


def test_drill_at_small_size_loses_only_what_the_archive_had_not_reached(tmp_path):
    report = run_drill(records=1500, work=str(tmp_path / "drill"), interval=0.3, writers=3)
    assert report["records_acknowledged"] >= 1500
    assert report["restored_records"] >= report["backup_records"] > 0
    assert report["lost_records"] < report["records_acknowledged"]
    through = report["archived_through_unix"]
    assert through is not None
    if report["lost_records"]:
        # A lost record was acknowledged after the last batch the archive holds was committed:
        # the promise is "nothing acknowledged before the last archive round is lost".
        assert report["lost_acks_unix"][0] >= through
    assert report["recovery_seconds"] >= report["restore_seconds"] > 0


def test_a_server_archives_exports_the_lag_and_backs_up_by_url(tmp_path, capsys):
    import json
    import signal
    import subprocess
    import sys
    import urllib.request

    from stemedb.cli import main

    archive = tmp_path / "archive"
    config = tmp_path / "stemedb.toml"
    config.write_text(f'[archive]\nurl = "file://{archive}"\ninterval = 0.2\n')
    server = subprocess.Popen([sys.executable, "-m", "stemedb.server", "--data", str(tmp_path / "d"),
                               "--listen", "127.0.0.1:0", "--http", "127.0.0.1:0", "--config",
                               str(config)], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                              text=True)
    try:
        announcement = json.loads(server.stdout.readline())
        url = f"stemedb://{announcement['listen']}"
        with stemedb.connect(url) as client:
            ids = client.put_many(batch("served", 40))
        objects = open_objects(str(archive))
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:     # a wait for the next round, not a timing assertion
            if objects.exists(catalog.ARCHIVE) and \
                    catalog.read_manifest(objects, catalog.ARCHIVE).records == len(ids):
                break
            time.sleep(0.05)
        assert catalog.read_manifest(objects, catalog.ARCHIVE).records == len(ids)
        # The round publishes its manifest first and then what it archived (so the lag never
        # reads lower than the truth): wait for that status too, then hold it to exactly 0.
        while True:
            metrics = urllib.request.urlopen(f"http://{announcement['http']}/metrics").read().decode()
            if "\nstemedb_archive_lag_seconds 0.0\n" in metrics or time.monotonic() > deadline:
                break
            time.sleep(0.05)
        assert "\nstemedb_archive_lag_seconds 0.0\n" in metrics
        assert "\nstemedb_archive_last_success_timestamp_seconds " in metrics
        assert "\nstemedb_archive_failures_total 0.0\n" in metrics
        assert main(["backup", "--url", url, "--to", str(tmp_path / "dest")]) == 0
        assert "40 records" in capsys.readouterr().out
    finally:
        server.send_signal(signal.SIGTERM)
        server.wait(timeout=60)
    assert server.returncode == 0
    target = str(tmp_path / "restored")
    assert restore([str(tmp_path / "dest")], target).records == 40


def test_an_unreachable_archive_fails_rounds_not_the_server(store, tmp_path, monkeypatch):
    import trio

    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", f"http://127.0.0.1:{_free_port()}")   # nobody there
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")
    archiver = Archiver(store, "s3://nowhere/db1", 1.0)      # starts: nothing reached yet
    try:
        store.put_many(batch("u"))
        with pytest.raises(stemedb.StemeError, match="S3 refused or could not be reached"):
            archiver.round()
        trio.run(archiver._round_in_thread)                   # what the server's loop runs
        status = archiver.status()
        assert status.failures == 1 and status.last_success_unix is None
        assert status.lag_seconds > 0                         # the write is not archived
    finally:
        archiver.close()


def test_a_stopping_server_archives_what_its_last_interval_left(tmp_path):
    import json
    import signal
    import subprocess
    import sys

    archive = tmp_path / "archive"
    config = tmp_path / "stemedb.toml"
    config.write_text(f'[archive]\nurl = "file://{archive}"\ninterval = 3600\n')   # one round, at start
    server = subprocess.Popen([sys.executable, "-m", "stemedb.server", "--data", str(tmp_path / "d"),
                               "--listen", "127.0.0.1:0", "--config", str(config)],
                              stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        announcement = json.loads(server.stdout.readline())
        with stemedb.connect(f"stemedb://{announcement['listen']}") as client:
            ids = client.put_many(batch("last", 25))
    finally:
        server.send_signal(signal.SIGTERM)
        server.wait(timeout=60)
    assert server.returncode == 0
    manifest = catalog.read_manifest(open_objects(str(archive)), catalog.ARCHIVE)
    assert manifest.records == len(ids) == 25


def test_a_full_commit_clock_thins_out_but_never_dates_a_batch_early(store, tmp_path, monkeypatch):
    archive = f"file://{tmp_path}/archive"
    archiver = Archiver(store, archive, 1.0)
    monkeypatch.setattr(archiver.clock, "limit", 4)
    try:
        groups, cuts = [], []
        for n in range(9):
            groups.append(set(store.put_many(batch(f"h{n}", 10))))
            cuts.append(now_us())
        assert len(archiver.clock.times(0, 0, 1 << 32)) <= 5
        archiver.round()
    finally:
        archiver.close()
    for n in range(9):
        target = str(tmp_path / f"as-of-{n}")
        restored = ids_of_restore(archive, target, cuts[n])
        assert restored <= set().union(*groups[:n + 1])      # never a later batch
    assert ids_of_restore(archive, str(tmp_path / "all"), cuts[-1]) == set().union(*groups)


def ids_of_restore(archive, target, as_of):
    restore([archive], target, as_of_us=as_of)
    return ids_of(target)
