"""`stemedb cluster status` and `stemedb cluster reload`: a cluster seen through its nodes.

Owns: asking every node of a cluster file over the binary protocol
(CLUSTER_STATUS, CLUSTER_RELOAD; docs/protocol.md, "Replication opcodes"),
and the status output — each node's state as its peers see it, record
count, partitions held, push queue depth and lag, and whether the replicas
of every partition agree (equal fingerprints); `ask`, one request to one
server, which `stemedb sync --url` uses too. Must never: change anything but
through CLUSTER_RELOAD, or read a data directory.

Error handling: a node that does not answer is reported as unreachable
(status exits 1 then, and when replicas disagree); a bad cluster file is
one line naming the key.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

if sys.version_info < (3, 11):
    from exceptiongroup import BaseExceptionGroup

from stemedb.cli.core import EXIT_ERROR, EXIT_OK, add_json_option

TIMEOUT = 10.0


def register(commands: Any) -> None:
    cluster = commands.add_parser("cluster", help="the nodes of a cluster file: status, reload")
    actions = cluster.add_subparsers(dest="cluster_action", metavar="ACTION", required=True)
    status = actions.add_parser("status", help="each node's state, records, partitions, push queues, "
                                               "and whether the replicas agree")
    reload = actions.add_parser("reload", help="ask every node to re-read the cluster file "
                                               "(as SIGHUP does)")
    for parser in (status, reload):
        parser.add_argument("--cluster", required=True, metavar="FILE", help="the cluster file")
        parser.add_argument("--token", default="", metavar="TOKEN",
                            help="a token the nodes accept (status: read; reload: admin)")
        add_json_option(parser)
    status.set_defaults(handler=run_status)
    reload.set_defaults(handler=run_reload)


def ask(url: str, token: str, opcode: int, payload: bytes, *, timeout: float = TIMEOUT) -> Any:
    """One request to the server at `url`; its JSON answer (raises the answer's error)."""
    import trio

    from stemedb.errors import Unsupported
    from stemedb.replication import framing
    from stemedb.replication.sync import parse_peer
    from stemedb.replication.transport import Link, sole_error, tcp_connector

    address = parse_peer(url)

    async def main() -> Any:
        async with trio.open_nursery() as nursery:
            connect = tcp_connector(lambda _peer: (address.host, address.port, address.tls))
            link = Link(str(address), connect, nursery, token=token, client_name="stemedb-cli",
                        hello_timeout=timeout)
            try:
                session = await link.connected()
                if not session.replication:
                    raise Unsupported(f"{address} does not serve replication (an older server, or "
                                      "server.sync = false there)")
                answer = await link.request(opcode, payload, timeout)
            finally:
                await link.close()
                nursery.cancel_scope.cancel()
        return framing.decode_json(answer, "answer")

    try:
        return trio.run(main)
    except BaseExceptionGroup as group:   # the nursery around one request: its one error
        raise sole_error(group) from None


def collect(cluster_file: str, token: str) -> dict[str, Any]:
    """Every node's CLUSTER_STATUS (or why it did not answer) and the agreement of the replicas."""
    from stemedb import _protocol
    from stemedb.errors import StemeError
    from stemedb.replication.cluster import ClusterFile
    from stemedb.replication.placement import Placement

    cluster = ClusterFile.load(cluster_file)
    nodes: dict[str, Any] = {}
    for node in cluster.nodes:
        try:
            nodes[node.id] = ask(f"stemedb://{node.address}", token, _protocol.CLUSTER_STATUS, b"")
        except StemeError as exc:
            nodes[node.id] = {"node": node.id, "address": node.address, "unreachable": str(exc)}
    placement = Placement(cluster)
    partitions: dict[str, Any] = {}
    for partition in range(cluster.partitions):
        holders = placement.replicas(partition)
        fingerprints = {n: nodes[n]["scopes"][str(partition)]["fingerprint"] for n in holders
                        if "scopes" in nodes[n] and str(partition) in nodes[n]["scopes"]}
        counts = {n: nodes[n]["scopes"][str(partition)]["count"] for n in fingerprints}
        partitions[str(partition)] = {"replicas": list(holders), "counts": counts,
                                      "agree": len(fingerprints) == len(holders)
                                      and len(set(fingerprints.values())) == 1}
    answered = [n for n in nodes.values() if "scopes" in n]
    global_agree = (len(answered) == len(cluster.nodes)
                    and len({n["scopes"]["global"]["fingerprint"] for n in answered}) == 1)
    states = {node.id: _state_seen(node.id, nodes) for node in cluster.nodes}
    return {"cluster": cluster.name, "version": cluster.version, "nodes": nodes, "states": states,
            "partitions": partitions, "global_agree": global_agree,
            "agree": global_agree and all(p["agree"] for p in partitions.values())}


def _state_seen(node_id: str, nodes: dict[str, Any]) -> str:
    """How the cluster sees `node_id`: unreachable from here, else the best state its peers give."""
    if "unreachable" in nodes[node_id]:
        return "unreachable"
    seen = [n["peers"][node_id]["state"] for n in nodes.values()
            if "peers" in n and node_id in n["peers"]]
    for state in ("up", "suspect", "down"):
        if state in seen:
            return state
    return "up"


def run_status(args: argparse.Namespace, context: Any) -> int:
    report = collect(args.cluster, args.token)
    if args.json:
        print(json.dumps(report, sort_keys=True))
        return EXIT_OK if report["agree"] else EXIT_ERROR
    print(f"cluster {report['cluster']} (file version {report['version']})")
    print(f"{'node':<12} {'state':<12} {'records':>10} {'partitions':<24} push queue (records, lag s)")
    for node_id, node in report["nodes"].items():
        if "unreachable" in node:
            print(f"{node_id:<12} {'unreachable':<12} {'-':>10} {'-':<24} {node['unreachable']}")
            continue
        held = ",".join(str(p) for p in node["partitions"]) or "-"
        queues = "  ".join(f"{peer}: {q['depth_records']}, {q['lag_seconds'] or 0:.2f}"
                           for peer, q in sorted(node["push"].items()))
        print(f"{node_id:<12} {report['states'][node_id]:<12} {node['records']:>10,} {held:<24} {queues}")
    disagree = [p for p, row in report["partitions"].items() if not row["agree"]]
    print("global partition: " + ("replicas agree" if report["global_agree"] else "replicas differ"))
    print("partitions: " + ("all replicas agree" if not disagree
                            else "replicas differ in " + ", ".join(disagree)))
    return EXIT_OK if report["agree"] else EXIT_ERROR


def run_reload(args: argparse.Namespace, context: Any) -> int:
    from stemedb import _protocol
    from stemedb.errors import StemeError
    from stemedb.replication.cluster import ClusterFile

    cluster = ClusterFile.load(args.cluster)
    answers: dict[str, Any] = {}
    for node in cluster.nodes:
        try:
            answers[node.id] = ask(f"stemedb://{node.address}", args.token, _protocol.CLUSTER_RELOAD, b"")
        except StemeError as exc:
            answers[node.id] = {"error": str(exc)}
    if args.json:
        print(json.dumps(answers, sort_keys=True))
    else:
        for node_id, answer in answers.items():
            if "error" in answer:
                print(f"{node_id:<12} not reloaded: {answer['error']}")
            else:
                print(f"{node_id:<12} version {answer['version']}: added {answer['added'] or '-'}, "
                      f"removed {answer['removed'] or '-'}")
    return EXIT_ERROR if any("error" in a for a in answers.values()) else EXIT_OK
