"""`stemedb query` and `stemedb conflicts`: answers picked by lenses.

Owns: the query options (lens, filters, times in ISO 8601), and the text of
resolutions and of the disagreement dashboard, rendered from the JSON-ready
documents both targets give (so a data directory and a server print the
same). Must never: resolve anything itself (the store or server does).

Error handling: an unknown lens, lifecycle or other bad filter is one line
naming it (the resolution engine's own message).
"""

from __future__ import annotations

import argparse
import math
from typing import Any

from stemedb.cli.core import EXIT_OK, UsageError, add_json_option, add_target_options
from stemedb.cli.formats import (
    SHORT_ID,
    dumps,
    float32_text,
    format_time,
    is_float32,
    object_text,
    parse_time,
)
from stemedb.cli.store import deprecated_path

LENSES = ("recency", "confidence", "consensus", "vote_consensus", "authority", "skeptic",
          "epoch_aware", "layered", "constraints")
SHOWN_CONTRIBUTIONS = 10


def register(commands: Any) -> None:
    query = commands.add_parser("query", help="resolve a subject (and predicate) through a lens")
    query.add_argument("words", nargs="+", metavar="SUBJECT [PREDICATE]",
                       help="the subject, and the predicate (omit it for every predicate)")
    query.add_argument("--lens", default="recency", help=f"{', '.join(LENSES)} (default recency)")
    query.add_argument("--lifecycle", default="any", help="any, approved, or a stage")
    query.add_argument("--as-of", metavar="TIME",
                       help="time travel: only claims made at or before TIME (ISO 8601 or µs)")
    query.add_argument("--decay", action="store_true", help="decay confidence by source-class half-life")
    query.add_argument("--now", metavar="TIME", help="the time decay is measured from (default now)")
    query.add_argument("--epoch", metavar="ID", help="only claims in this epoch (ID or unique prefix)")
    query.add_argument("--audit", action="store_true", help="record this query in the audit log")
    query.add_argument("--agent", help="who is asking, for the audit log (a server names the token)")
    add_target_options(query)
    add_json_option(query)
    query.set_defaults(handler=run_query)

    conflicts = commands.add_parser("conflicts", help="the most contested (subject, predicate) pairs")
    conflicts.add_argument("path", nargs="?", metavar="DIR", help="deprecated: use --data DIR")
    conflicts.add_argument("--top", type=int, default=20, help="how many pairs (default 20)")
    conflicts.add_argument("--min-score", type=float, default=0.0, help="leave out pairs below it")
    conflicts.add_argument("--lifecycle", default="any", help="any, approved, or a stage")
    conflicts.add_argument("--as-of", metavar="TIME", help="only claims made at or before TIME")
    add_target_options(conflicts)
    add_json_option(conflicts)
    conflicts.set_defaults(handler=run_conflicts)


def _time_option(value: str | None, name: str) -> int | None:
    return None if value is None else parse_time(value, name)


def run_query(args: argparse.Namespace, context: Any) -> int:
    """Resolve a subject (and predicate) through a lens."""
    if len(args.words) > 2:
        raise UsageError("query takes SUBJECT [PREDICATE]; a data directory goes in --data DIR")
    subject, predicate = args.words[0], (args.words[1] if len(args.words) > 1 else None)
    filters: dict[str, Any] = {"lifecycle": args.lifecycle,
                               "as_of": _time_option(args.as_of, "--as-of"),
                               "now": _time_option(args.now, "--now"),
                               "decay": args.decay, "audit": args.audit, "agent": args.agent}
    store = context.store()
    if args.epoch is not None:
        filters["epoch"] = store.resolve_id(args.epoch, "--epoch").hex()
    filters = {name: value for name, value in filters.items() if value not in (None, False)}
    result = store.query(subject, predicate, args.lens, filters)
    if args.json:
        print(dumps(result))
    elif predicate is not None:
        print(render_resolution(result))
    else:
        print("\n\n".join(render_resolution(r) for r in result.values()) or "no candidates")
    return EXIT_OK


def run_conflicts(args: argparse.Namespace, context: Any) -> int:
    """The disagreement dashboard: the most contested (subject, predicate) pairs."""
    deprecated_path(args, context)
    if args.top < 0:
        raise UsageError(f"--top: {args.top} must be 0 or more")
    rows = context.store().conflicts(args.lifecycle, _time_option(args.as_of, "--as-of"),
                                     args.min_score)
    # One order for both targets: score, then candidates, then the pair by name.
    rows.sort(key=lambda r: (-r["conflict_score"], -r["candidates_count"], r["subject"], r["predicate"]))
    rows = rows[:args.top]
    if args.json:
        print(dumps(rows))
    else:
        print(render_conflicts(rows))
    return EXIT_OK


# ------------------------------------------------------------------ text

def score_text(value: float | None) -> str:
    """A lens's figure: a float32 as written (0.9), anything else to 4 decimals."""
    if value is None or not math.isfinite(value):
        return str(value)
    if is_float32(value):
        return float32_text(value)
    return f"{value:.4f}"


def render_resolution(r: dict[str, Any]) -> str:
    winner = r.get("winner")
    lines = [f"{r['subject']} / {r.get('predicate') or '*'}  (lens {r['lens']})",
             "  winner      " + (f"{object_text(winner['object'])}  [{winner['id'][:SHORT_ID]}]  "
                                 f"{format_time(winner['timestamp'])}" if winner else "(none)"),
             f"  confidence  {score_text(r['confidence'])}",
             f"  conflict    {score_text(r['conflict_score'])}",
             f"  candidates  {r['candidates_count']}"]
    lines += _analysis_lines(r.get("analysis"))
    contributions = r.get("contributions") or []
    if contributions:
        lines.append("  contributions (weight, lifecycle, assertion; * supports the winner)")
    for c in contributions[:SHOWN_CONTRIBUTIONS]:
        lines.append(f"    {score_text(c['weight']):>8s}  {c['lifecycle']:12s} "
                     f"{c['assertion_id'][:SHORT_ID]}{'  *' if c['supports'] else ''}")
    if len(contributions) > SHOWN_CONTRIBUTIONS:
        lines.append(f"    ... {len(contributions) - SHOWN_CONTRIBUTIONS} more")
    return "\n".join(lines)


def _analysis_lines(analysis: Any) -> list[str]:
    """Lens-specific details: Skeptic's claims, Layered's tiers, Constraints' rules, EpochAware's drops."""
    if not isinstance(analysis, dict):
        return []
    lines: list[str] = []
    if "status" in analysis:
        lines.append(f"  status      {analysis['status']}")
        for claim in analysis.get("claims", [])[:SHOWN_CONTRIBUTIONS]:
            lines.append(f"    {claim['share']:6.1%}  {object_text(claim['value'])}  "
                         f"({claim['assertions']} assertions)")
    for tier in analysis.get("tiers", []):
        winner = tier.get("winner")
        lines.append(f"    {tier['source_class']:14s} "
                     f"{object_text(winner['object']) if winner else '(none)'}  confidence "
                     f"{score_text(tier['confidence'])}  conflict {score_text(tier['conflict_score'])}")
    if "must_use" in analysis:
        for name in ("must_use", "forbidden"):
            values = ", ".join(object_text(rule["value"]) for rule in analysis[name])
            lines.append(f"  {name.replace('_', ' '):11s} {values or '(none)'}")
        if analysis.get("conflicts"):
            lines.append("  CONFLICTS   " + ", ".join(object_text(v) for v in analysis["conflicts"]))
    if "dropped" in analysis:
        lines.append(f"  superseded  {analysis['dropped']} candidates dropped")
        lines += _analysis_lines(analysis.get("inner"))
    return lines


def render_conflicts(rows: list[dict[str, Any]]) -> str:
    if not rows:
        return "no contested (subject, predicate) pairs"
    lines = [f"{'score':>6}  {'claims':>6}  {'cands':>6}  subject / predicate"]
    lines += [f"{r['conflict_score']:6.3f}  {r['claims_count']:6d}  {r['candidates_count']:6d}  "
              f"{r['subject']} / {r['predicate']}" for r in rows]
    return "\n".join(lines)
