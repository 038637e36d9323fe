"""The scrub behind `Database.verify()`: every byte of the store checked against what it claims.

Owns: walking every segment from its first frame with every record ID
re-hashed (engine/walk.py), checking each sealed segment against its footer
(record count, CRC-32C digest, zeros after its end), spares (all zero),
missing files, and what recovery left (set-aside files, copies still owed,
held-back members, frames it refused), and whether every indexed record's
frame is intact; the `VerifyReport` that says so. Must never: write,
repair or stop serving anything (it reports; operators and replication
repair).

Error handling: nothing is raised for damage; it is all in the report.
"""

from __future__ import annotations

import os
import threading

import numpy as np

from stemedb import _hash, _segment
from stemedb.engine import walk
from stemedb.engine.indexes import State
from stemedb.engine.recovery import Recovery
from stemedb.engine.segments import Segment, SegmentLog
from stemedb.engine.walk import Damage
from stemedb.reports import VerifyReport as VerifyReport  # the engine names it too (stemedb.engine)


def scrub(log: SegmentLog, state: State, lock: threading.RLock, recovery: Recovery) -> VerifyReport:
    """Scrub the whole store (see the module doc)."""
    damage: list[Damage] = []
    intact: list[np.ndarray] = [np.zeros(0, dtype=np.uint64)]
    checked = 0
    with lock:   # no write moves the indexed position or a segment's seal meanwhile
        for segment in log.segments:
            checked += _scrub_segment(log, state, recovery, segment, damage, intact)
        damage.extend(recovery.held_back_damage())
        damage.extend(recovery.unverified)
        pending = {(p.segment.number, p.start) for p in recovery.pending_set_aside}
        damage.extend(d for d in recovery.report.damage if d.kind == walk.NOT_SET_ASIDE
                      and (_segment_number(d.path), d.offset) in pending)
        locations = state.columns.view("location")
        lost = np.nonzero(~np.isin(locations, np.concatenate(intact)))[0]
        lost_where = int(locations[lost[0]]) if len(lost) else 0
    damage.extend(recovery.quarantine_damage())
    problems = recovery.report.plain_problems() + [d.text() for d in damage]
    if len(lost):
        segment = log.segments[lost_where >> 32]
        problems.append(f"{len(lost)} indexed records were not found intact in the segments "
                        f"(the first in {segment.path} at offset {lost_where & 0xFFFFFFFF})")
    return VerifyReport(ok=not problems, records_checked=checked, problems=problems, damage=damage)


def _segment_number(path: str) -> int:
    name = os.path.basename(path)
    return int(name[:-4]) if name.endswith(".seg") and name[:-4].isdigit() else -1


def _scrub_segment(log: SegmentLog, state: State, recovery: Recovery, segment: Segment,
                   damage: list[Damage], intact: list[np.ndarray]) -> int:
    """Check one segment (under the state lock); returns the intact record frames in it."""
    if segment.missing:
        damage.append(Damage(walk.MISSING, segment.path, detail=log.missing_text(segment)))
        return 0
    start = _segment.HEADER_SIZE
    if segment.number > log.active_number:
        end = _segment.last_nonzero(segment.buffer, start, segment.size)
        if end > start:
            damage.append(Damage(walk.DAMAGED, segment.path, start, end - start,
                                 _segment.count_record_headers(segment.buffer, start, end),
                                 detail="of data in a spare segment (after the active one)"))
        return 0
    if segment.footer_problem is not None or (segment.sealed and segment.version >= 2
                                              and segment.footer is None):
        damage.append(Damage(walk.FOOTER, segment.path, segment.limit,
                             detail=segment.footer_problem or
                             f"{segment.path} at offset {segment.limit}: sealed (later "
                             "segments hold data) but it has no footer"))
    if not segment.sealed:
        # Only what is indexed: frames past it may be a commit in flight.
        number, offset = state.position
        limit = offset if number == segment.number else start
    else:
        limit = segment.frames_end
    walked = walk.walk(segment.buffer, start, limit, verify_ids=True)
    pending = {p.start for p in recovery.pending_set_aside if p.segment is segment}
    found = len(damage)
    for gap in walked.gaps:
        if (gap.zero and recovery.quarantined(segment, gap)) or gap.start in pending:
            continue
        kind = walk.ZEROED if gap.zero else walk.DAMAGED
        what = walk.describe_gap(gap, at_tail=gap is walked.tail_gap)
        damage.append(walk.gap_damage(kind, segment.path, gap, what))
    if segment.footer is not None:
        _scrub_footer(segment, walked, damage, quiet=len(damage) > found)
    for run in walked.runs:
        positions = run.scan["positions"][run.scan["types"] == _segment.RECORD]
        intact.append((np.uint64(segment.number) << np.uint64(32)) | positions.astype(np.uint64))
    return walked.records


def _scrub_footer(segment: Segment, walked: walk.Walk, damage: list[Damage], quiet: bool) -> None:
    """A sealed segment against its footer: record count, digest, zeros after the end."""
    footer = segment.footer
    assert footer is not None
    start, end = _segment.HEADER_SIZE, footer["end"]
    if walked.records != footer["records"]:
        damage.append(Damage(
            walk.DAMAGED, segment.path, start, end - start, footer["records"] - walked.records,
            detail=f"hold {walked.records} intact record frames where its footer counts "
                   f"{footer['records']}"))
    elif not quiet and _hash.crc32c(segment.buffer[start:end]) != footer["digest"]:
        damage.append(Damage(walk.DAMAGED, segment.path, start, end - start,
                             detail="whose CRC-32C does not match the footer's digest "
                                    "(damage outside any frame's checksum, e.g. padding)"))
    after = _segment.last_nonzero(segment.buffer, end, segment.limit)
    if after > end:
        damage.append(Damage(walk.DAMAGED, segment.path, end, after - end,
                             detail="of unexpected data after the footer's end of frames"))
