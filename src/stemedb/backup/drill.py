"""The disaster-recovery drill: lose a serving store, restore it, and measure what it cost.

Owns: one drill, end to end, with real processes: a server (`python -m
stemedb.server`) on a fresh data directory with continuous archival;
client writers that record every acknowledged ID and when it was
acknowledged; a backup taken halfway through; SIGKILL of the server while
writes are in flight; the data directory deleted; a restore from the backup
plus the archive to a new directory; the server started on it; and then
every acknowledged ID asked for. The report gives the recovery time (kill
to the restarted server's first answer) and the data loss (acknowledged
records missing, and the window of acknowledgement times they span, ending
at the kill) beside the reference architecture's single-node pilot (restore
from a daily backup: recovery 2 h, loss window 24 h).

Must never: leave a server running (it is killed in every case) or touch
anything outside its working directory. Resource handling: the working
directory is removed at the end unless the caller named it.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from typing import Any

import stemedb
from stemedb.backup import catalog
from stemedb.backup.copy import backup
from stemedb.backup.objects import open_objects
from stemedb.backup.restore import restore
from stemedb.errors import StemeError

REFERENCE = {"recovery_seconds": 2 * 3600, "loss_window_seconds": 24 * 3600}
BATCH = 50           # records per client write
START_TIMEOUT = 120.0


def run_drill(*, records: int, work: str | None = None, interval: float = 1.0,
              archive: str | None = None, writers: int = 4) -> dict[str, Any]:
    """Run one drill and return its report (see the module doc)."""
    own = work is None
    root = tempfile.mkdtemp(prefix="stemedb-drill-") if work is None else os.path.abspath(work)
    os.makedirs(root, exist_ok=True)
    data, restored = os.path.join(root, "data"), os.path.join(root, "restored")
    backups = os.path.join(root, "backup")
    archive = archive or "file://" + os.path.join(root, "archive")
    config = os.path.join(root, "stemedb.toml")
    with open(config, "w") as handle:
        handle.write(f'[archive]\nurl = "{archive}"\ninterval = {interval}\n')
    server: subprocess.Popen[str] | None = None
    try:
        server, url = _start(data, config)
        acked: list[tuple[float, list[bytes]]] = []
        half = threading.Event()
        stop = threading.Event()
        lock = threading.Lock()
        errors: list[str] = []
        counted = [0]     # records acknowledged so far (under `lock`)
        per_writer = -(-records // writers)
        threads = [threading.Thread(target=_write, args=(url, w, per_writer, acked, counted, lock,
                                                        half, stop, errors, records), daemon=True)
                   for w in range(writers)]
        for thread in threads:
            thread.start()
        half.wait()
        backup_started = time.time()
        taken = backup(data, backups)
        backup_seconds = time.time() - backup_started
        # Keep writing until every writer is past its quota and the archive has taken at least
        # one round since the start (a fast machine can write a small quota within the first
        # interval), then kill while writes are in flight.
        deadline: float | None = None   # set once the quota is written: how long to await a round
        while any(t.is_alive() for t in threads):
            if counted[0] >= records:
                deadline = deadline or time.time() + max(30.0, 20 * interval)
                if _archived_through(archive) is not None or time.time() > deadline:
                    break
            time.sleep(0.05)
        killed = time.time()
        server.send_signal(signal.SIGKILL)
        server.wait()
        stop.set()
        for thread in threads:
            thread.join(timeout=30)
        shutil.rmtree(data)
        archived_through = _archived_through(archive)
        restore_started = time.time()
        result = restore([backups, archive], restored)
        restore_seconds = time.time() - restore_started
        server, url = _start(restored, config)
        serving = time.time()
        with stemedb.connect(url) as client:   # type: ignore[attr-defined]
            client.ping()
            serving = time.time()
            missing = _missing(client, acked)
        lost_times = [when for when, ids in missing for _ in ids]
        acknowledged = sum(len(ids) for _, ids in acked)
        last_ack = max((when for when, _ in acked), default=killed)
        return {
            "records_acknowledged": acknowledged,
            "writers": writers,
            "archive": archive,
            "archive_interval_seconds": interval,
            "backup_records": taken.manifest.records,
            "backup_seconds": round(backup_seconds, 3),
            "restored_records": result.records,
            "restore_seconds": round(restore_seconds, 3),
            "recovery_seconds": round(serving - killed, 3),
            "lost_records": len(lost_times),
            "loss_window_seconds": round(killed - min(lost_times), 3) if lost_times else 0.0,
            "lost_ack_span_seconds": round(max(lost_times) - min(lost_times), 3) if lost_times else 0.0,
            "last_ack_before_kill_seconds": round(killed - last_ack, 3),
            "write_errors_after_kill": len(errors),
            "archived_through_unix": archived_through,
            "lost_acks_unix": [min(lost_times), max(lost_times)] if lost_times else None,
            "reference": REFERENCE,
        }
    finally:
        if server is not None and server.poll() is None:
            server.kill()
            server.wait()
        if own:
            shutil.rmtree(root, ignore_errors=True)


def format_report(report: dict[str, Any]) -> str:
    reference = report["reference"]
    return "\n".join([
        f"drill: {report['records_acknowledged']:,} records acknowledged by {report['writers']} "
        f"writers; backup of {report['backup_records']:,} records in {report['backup_seconds']} s; "
        f"archive {report['archive']} every {report['archive_interval_seconds']} s",
        f"recovery time (SIGKILL → serving): {report['recovery_seconds']:.2f} s "
        f"(restore {report['restore_seconds']:.2f} s of it)   reference: "
        f"{reference['recovery_seconds'] / 3600:.0f} h",
        f"data loss: {report['lost_records']:,} acknowledged records missing, window "
        f"{report['loss_window_seconds']:.3f} s before the kill   reference: "
        f"{reference['loss_window_seconds'] / 3600:.0f} h",
    ])


def _start(data: str, config: str) -> tuple[subprocess.Popen[str], str]:
    command = [sys.executable, "-m", "stemedb.server", "--data", data, "--listen",
               "127.0.0.1:0", "--config", config]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                               text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    assert process.stdout is not None
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        line = process.stdout.readline()
        if not line:
            break
        if line.startswith("{"):
            announcement = json.loads(line)
            return process, f"stemedb://{announcement['listen']}"
    process.kill()
    process.wait()
    raise StemeError(f"the drill's server on {data} did not start (exit {process.returncode})")


def _write(url: str, writer: int, count: int, acked: list[tuple[float, list[bytes]]],
           counted: list[int], lock: threading.Lock, half: threading.Event, stop: threading.Event,
           errors: list[str], total: int) -> None:
    signer = stemedb.Signer.from_seed(bytes([writer + 1]) * 32)
    written = 0
    try:
        client = stemedb.connect(url)   # type: ignore[attr-defined]
    except Exception as exc:
        errors.append(str(exc))
        return
    try:
        batch_number = 0
        while not stop.is_set():
            size = BATCH if written < count else 1   # past its quota: a trickle until the kill
            records = [stemedb.Assertion(f"drill-{writer}-{batch_number}", "n", i).sign(signer)
                       for i in range(size)]
            batch_number += 1
            try:
                ids = client.put_many(records)
            except Exception as exc:
                errors.append(str(exc))
                return
            now = time.time()
            with lock:
                acked.append((now, list(ids)))
                counted[0] += len(ids)
                if counted[0] >= total // 2:
                    half.set()
            written += len(ids)
    finally:
        try:
            client.close()
        except Exception:
            pass


def _archived_through(archive: str) -> float | None:
    """The commit time (Unix s) of the last batch archive.json names, None if none is timed."""
    try:
        manifest = catalog.read_manifest(open_objects(archive), catalog.ARCHIVE)
    except StemeError:
        return None
    times = [int(us) for segment in manifest.segments for part in segment["parts"]
             for _, us in part["commits"] or ()]
    return max(times) / 1e6 if times else None


def _missing(client: Any, acked: list[tuple[float, list[bytes]]]) -> list[tuple[float, list[bytes]]]:
    missing = []
    for when, ids in acked:
        found = client.get_many(ids)
        absent = [record_id for record_id, record in zip(ids, found) if record is None]
        if absent:
            missing.append((when, absent))
    return missing
