"""`stemedb backup`, `stemedb restore` and `stemedb drill`: copies of a store, and proof they restore.

Owns: the commands' options and output; the work is stemedb.backup's.
`backup` copies a store that may be serving writes (it reads the files and
never takes the LOCK). With `--url` the server is asked for its data
directory (STATS) and the copy is made from that directory by this process:
`--url` therefore works on the server's host (or a host that mounts its
data directory), and says so when the directory is not reachable here.
Must never: open the store for writing, or leave a half-restored target.

Error handling: every refusal is one line naming what is wrong (the file or
object of a damaged backup, the non-empty target), exit 1.
"""

from __future__ import annotations

import argparse
import json
import os
from typing import Any

from stemedb.cli.core import EXIT_OK, CliError, UsageError, add_json_option, add_target_options


def register(commands: Any) -> None:
    backup = commands.add_parser("backup", help="copy a store (serving or not) to a directory "
                                 "or s3://; repeated backups copy only what is new")
    add_target_options(backup)
    target = backup.add_mutually_exclusive_group()
    target.add_argument("--to", metavar="DEST", help="directory, file:///dir or s3://bucket/prefix")
    target.add_argument("--list", metavar="DEST", help="list the backups (and archive) at DEST")
    add_json_option(backup)
    backup.set_defaults(handler=run_backup)

    restore = commands.add_parser("restore", help="restore a backup or the archive into a new "
                                  "directory, verified, optionally as of a time")
    restore.add_argument("source", metavar="SOURCE", help="backup destination or archive "
                         "(directory, file:///dir or s3://bucket/prefix)")
    restore.add_argument("--to", metavar="DIR", required=True,
                         help="new or empty directory for the restored store")
    restore.add_argument("--as-of", metavar="TIME", help="keep only the batches committed at or "
                         "before TIME (ISO 8601, UTC if no zone, or µs since 1970)")
    restore.add_argument("--archive", metavar="URL", action="append", default=[],
                         help="a further source, e.g. the archive beside a backup (repeatable)")
    restore.add_argument("--backup", metavar="NAME", help="restore this manifest of SOURCE "
                         "(backups/….json or archive.json; default: the newest)")
    add_json_option(restore)
    restore.set_defaults(handler=run_restore)

    drill = commands.add_parser("drill", help="disaster-recovery drill: write, back up, archive, "
                                "SIGKILL, destroy, restore, restart; prints recovery time and loss")
    drill.add_argument("--records", type=int, default=20_000, help="records to write (default 20000)")
    drill.add_argument("--work", metavar="DIR", help="working directory (default: a new temporary one)")
    drill.add_argument("--interval", type=float, default=1.0,
                       help="archive interval in seconds (default 1.0)")
    drill.add_argument("--archive", metavar="URL", help="archive location (default: WORK/archive)")
    drill.add_argument("--writers", type=int, default=4, help="concurrent client writers (default 4)")
    add_json_option(drill)
    drill.set_defaults(handler=run_drill)


def _data_directory(args: argparse.Namespace, context: Any) -> str:
    target = context.target
    if target.url is None:
        return str(target.data)
    path = str(context.store().stats().get("path") or "")
    if not path or not os.path.exists(os.path.join(path, "MANIFEST")):
        where = path or "a directory it does not name"
        raise CliError(f"the server at {target.url} keeps its store in {where}, which is not "
                       "reachable from this machine; --url needs the server's filesystem: run "
                       "stemedb backup on the server's host")
    return path


def run_backup(args: argparse.Namespace, context: Any) -> int:
    from stemedb.backup import catalog
    from stemedb.backup.copy import backup
    from stemedb.backup.objects import open_objects

    if args.list is not None:
        objects = open_objects(args.list)
        manifests = [catalog.read_manifest(objects, name) for name in catalog.manifest_names(objects)]
        if args.json:
            print(json.dumps([_summary(m) for m in manifests], indent=1))
            return EXIT_OK
        if not manifests:
            print(f"no backups at {args.list}")
        for manifest in manifests:
            summary = _summary(manifest)
            print(f"{summary['name']}  {summary['kind']:<7} {summary['taken']}  "
                  f"{summary['records']:>12,} records  position {summary['position'][0]}:"
                  f"{summary['position'][1]}  {summary['bytes'] / 2**20:,.1f} MiB")
        return EXIT_OK
    if args.to is None:
        raise UsageError("backup needs --to DEST (or --list DEST)")
    source = _data_directory(args, context)
    copied = backup(source, args.to)
    summary = {**_summary(copied.manifest), "copied_objects": copied.objects,
               "copied_bytes": copied.bytes, "recopied_segments": copied.recopied,
               "destination": args.to}
    if args.json:
        print(json.dumps(summary, indent=1))
        return EXIT_OK
    print(f"backed up {source} to {args.to}: {summary['records']:,} records up to position "
          f"{summary['position'][0]}:{summary['position'][1]}; copied {copied.objects} new "
          f"object(s), {copied.bytes:,} bytes; manifest {copied.manifest.name}")
    return EXIT_OK


def _summary(manifest: Any) -> dict[str, Any]:
    from stemedb.backup import catalog

    return {"name": manifest.name, "kind": manifest.kind, "taken": catalog.iso(manifest.taken_us),
            "records": manifest.records, "position": list(manifest.position),
            "bytes": manifest.bytes_held(), "record_digest": manifest.document["record_digest"]}


def run_restore(args: argparse.Namespace, context: Any) -> int:
    from stemedb.backup import catalog
    from stemedb.backup.restore import restore

    as_of = catalog.parse_time(args.as_of) if args.as_of is not None else None
    restored = restore([args.source, *args.archive], args.to, as_of_us=as_of, backup=args.backup)
    result = {"target": restored.target, "records": restored.records,
              "position": list(restored.position), "sources": restored.sources,
              "as_of": catalog.iso(as_of) if as_of is not None else None, "verified": True}
    if args.json:
        print(json.dumps(result, indent=1))
        return EXIT_OK
    print(f"restored {restored.records:,} records to {restored.target} from "
          f"{', '.join(restored.sources)}" + (f" as of {result['as_of']}" if as_of is not None else "")
          + f"; position {restored.position[0]}:{restored.position[1]}; verified")
    return EXIT_OK


def run_drill(args: argparse.Namespace, context: Any) -> int:
    from stemedb.backup.drill import format_report
    from stemedb.backup.drill import run_drill as drill

    if args.records < 1 or args.writers < 1 or not args.interval > 0:
        raise UsageError("--records and --writers must be at least 1, --interval positive")
    report = drill(records=args.records, work=args.work, interval=args.interval,
                   archive=args.archive, writers=args.writers)
    if args.json:
        print(json.dumps(report, indent=1))
    else:
        print(format_report(report))
    return EXIT_OK
