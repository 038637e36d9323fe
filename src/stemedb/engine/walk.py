"""What a segment holds after a crash or damage: intact frames, and the bytes that are not.

Owns: the walk over a mapped segment that recovery (engine/recovery.py, on
open) and the scrub (engine/scrub.py, `verify`) share — frame by frame,
resynchronising after anything unreadable to the next frame that checks, up
to the last non-zero byte — and the `Damage` entries through which recovery,
`stats()` and `verify()` report what they found (docs/format.md,
"Recovery"). Must never: index or serve records (recovery decides that from
the intact runs), or write a byte (SegmentLog sets bytes aside).

The walk trusts a frame found by resynchronisation only if its checksum
passes and, when asked, its recomputed ID matches: a resync can land inside
a damaged frame's payload, where the bytes of another frame may sit.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

from stemedb import _segment

# Damage kinds (the `kind` of a Damage entry; docs/format.md, "Recovery").
SET_ASIDE = "set aside"          # copied to a quarantine file, then zeroed in the segment
NOT_SET_ASIDE = "not set aside"  # should be set aside, but the copy failed (disk full)
DAMAGED = "damaged"              # unreadable bytes left in place (a sealed segment, or found by verify)
ZEROED = "zeroed"                # zeros where frames were, with intact frames after them
MISSING = "missing"              # a segment file that should exist
FOOTER = "footer"                # a sealed segment's footer is damaged or absent
HELD_BACK = "held back"          # intact envelope members whose envelope is not stored
UNVERIFIED = "unverified"        # a frame found after damage whose record fails its proof


@dataclass
class Damage:
    """One thing recovery or verify found wrong, with where it is and what it cost."""

    kind: str
    path: str
    offset: int = 0
    length: int = 0                 # bytes concerned
    records: int | None = None      # records concerned, where known
    copy: str | None = None         # the quarantine file that holds the bytes
    detail: str = ""

    def text(self) -> str:
        where = f"{self.path} at offset {self.offset}"
        records = "" if self.records is None else f", {self.records} record frame(s)"
        if self.kind == SET_ASIDE:
            return (f"{where}: {self.length} bytes set aside to {self.copy}{records} "
                    f"{self.detail}".rstrip())
        if self.kind == NOT_SET_ASIDE:
            return (f"{where}: {self.length} unreadable bytes{records} could not be set aside "
                    f"({self.detail}); writes are refused until they are")
        if self.kind == MISSING:
            return self.detail
        if self.kind == FOOTER:
            return f"{self.detail}; its frames are read up to the footer's place"
        if self.kind == HELD_BACK:
            return (f"{where}: {self.records} member record(s) held back, not served: "
                    f"{self.detail}")
        return f"{where}: {self.length} bytes {self.detail}{records}".rstrip()

    def as_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "path": self.path, "offset": self.offset,
                "bytes": self.length, "records": self.records, "copy": self.copy,
                "text": self.text()}


@dataclass
class Run:
    """Consecutive intact frames, as `_segment.scan` returns them."""

    scan: dict[str, Any]
    resynced: bool                  # found by resynchronising after a gap


@dataclass
class Gap:
    """Bytes [start, end) that hold no intact frame, between intact runs or after the last."""

    start: int                      # where the intact frames stopped
    end: int                        # where the next intact frame starts (or the data ends)
    data_end: int                   # just past the last non-zero byte of the gap (start if none)
    records: int                    # record frame headers still recognisable in it
    id_mismatch: bool = False       # the first frame there passed its checksum, not its ID check

    @property
    def zero(self) -> bool:
        return self.data_end <= self.start

    @property
    def length(self) -> int:
        return (self.end if self.zero else self.data_end) - self.start


@dataclass
class Walk:
    runs: list[Run] = field(default_factory=list)
    gaps: list[Gap] = field(default_factory=list)
    end: int = 0                    # just past the last intact frame: where appending may go on
    records: int = 0                # intact record frames

    @property
    def tail_gap(self) -> Gap | None:
        """A gap after the last intact frame (nothing intact follows it)."""
        return self.gaps[-1] if self.gaps and self.gaps[-1].start >= self.end else None


def walk(buffer: Any, start: int, limit: int, *, verify_ids: bool = False) -> Walk:
    """The intact frames and the gaps of buffer[start:limit].

    A frame that fails its magic, type, length or checksum — or a zero where a
    frame should start while non-zero bytes follow — opens a gap; the walk
    resumes at the next 8-aligned offset where a frame checks (re-hashing the
    IDs of every frame found that way), and ends at the last non-zero byte.
    `verify_ids` re-hashes the IDs of every frame, not only resynchronised ones.
    """
    data_end = _segment.last_nonzero(buffer, start, limit)
    result = Walk(end=start)
    position, resynced = start, False
    while True:
        scan = _segment.scan(buffer, position, limit, verify_ids=verify_ids or resynced)
        mismatch = bool(scan.get("id_mismatch"))
        if mismatch:
            scan = _cut(scan, min(scan["id_mismatch"]))
        if len(scan["types"]):
            result.runs.append(Run(scan, resynced))
            result.records += int((scan["types"] == _segment.RECORD).sum())
            result.end = scan["stop"]
        stop = scan["stop"]
        if stop >= data_end and not mismatch:
            return result
        resume = _segment.find_frame(buffer, stop + _segment.ALIGN, limit)
        gap_end = resume if resume >= 0 else max(data_end, stop)
        nonzero_end = _segment.last_nonzero(buffer, stop, gap_end)
        result.gaps.append(Gap(stop, gap_end, nonzero_end,
                               _segment.count_record_headers(buffer, stop, nonzero_end), mismatch))
        if resume < 0:
            return result
        position, resynced = resume, True


def _cut(scan: dict[str, Any], position: int) -> dict[str, Any]:
    """The part of a scan before the frame at `position` (which failed its ID check)."""
    keep = scan["positions"] < position
    return {"types": scan["types"][keep], "positions": scan["positions"][keep],
            "lengths": scan["lengths"][keep], "stop": position, "reason": _segment.BAD,
            "id_mismatch": []}


def gap_damage(kind: str, path: str, gap: Gap, what: str) -> Damage:
    return Damage(kind, path, gap.start, gap.length, gap.records, detail=what)


def describe_gap(gap: Gap, *, at_tail: bool) -> str:
    """What a gap is, for a report line."""
    if gap.id_mismatch:
        return "where a frame's stored ID does not match its record's content"
    if gap.zero:
        return "of zeros where frames were expected (intact frames follow); records there are lost"
    if at_tail:
        return "of unexpected data after the last frame"
    return "that fail their frame checks (intact frames follow)"


def quarantine_damage(path: str, segment_path: str, offset: int, data: bytes) -> Damage:
    """A set-aside file found in segments/ (written by this open or an earlier one)."""
    records = _segment.count_record_headers(data, 0, len(data) - len(data) % _segment.ALIGN) \
        if len(data) >= _segment.ALIGN else 0
    return Damage(SET_ASIDE, segment_path, offset, len(data), records, copy=os.path.basename(path),
                  detail="(review it, then delete it; verify reports it until then)")
