"""The cluster file: the keys as written work; every mistake is one error naming the key.

Each invalid file differs from a valid one in exactly one place, and the
error must name that key and what is wrong with it; comparing two versions
lists the nodes added, removed and readdressed, and refuses a reload that
would move the node to another cluster or forgets to bump the version.
"""

from __future__ import annotations

import pytest

from stemedb.errors import StemeError
from stemedb.replication.cluster import (
    ClusterFile,
    ClusterFileError,
    ReplicationSettings,
    compare,
    parse_address,
)

VALID = """\
name = "demo"
version = 1
replication_factor = 2
partitions = 256
acks = "1"            # or "all"
[[nodes]]
id = "n1"
address = "127.0.0.1:7451"
[[nodes]]
id = "n2"
address = "127.0.0.1:7452"
[[nodes]]
id = "n3"
address = "[::1]:7453"
"""


def test_the_example_parses_as_written():
    cluster = ClusterFile.parse(VALID)
    assert (cluster.name, cluster.version, cluster.replication_factor, cluster.partitions,
            cluster.acks) == ("demo", 1, 2, 256, "1")
    assert cluster.node_ids == ("n1", "n2", "n3")
    assert cluster.node("n3").host == "::1" and cluster.node("n3").port == 7453
    assert cluster.node("n1").address == "127.0.0.1:7451"
    assert cluster.peers_of("n2") == ("n1", "n3")
    assert cluster.replication == ReplicationSettings()
    assert cluster.replication.suspect_after == 2.0 and cluster.replication.heartbeat_interval == 0.5


def test_acks_defaults_to_one_and_accepts_all():
    assert ClusterFile.parse(VALID.replace('acks = "1"            # or "all"\n', "")).acks == "1"
    assert ClusterFile.parse(VALID.replace('acks = "1"', 'acks = "all"')).acks == "all"
    assert ClusterFile.parse(VALID.replace('acks = "1"', "acks = 1")).acks == "1"


def test_replication_table_overrides_defaults():
    text = VALID + "[replication]\nsuspect_after = 3\ndown_after = 9.5\npush_queue_records = 10\n"
    settings = ClusterFile.parse(text).replication
    assert (settings.suspect_after, settings.down_after, settings.push_queue_records) == (3.0, 9.5, 10)
    assert settings.heartbeat_interval == 0.5 and settings.push_window == 2
    assert ClusterFile.parse(VALID + "[replication]\npush_window = 8\n").replication.push_window == 8


def test_unknown_node_is_named():
    with pytest.raises(ClusterFileError, match=r"no node 'n9' in the cluster \(nodes: n1, n2, n3\)"):
        ClusterFile.parse(VALID).node("n9")


MISTAKES = [
    # (replace this, with this, the error must match)
    ('name = "demo"\n', 'name = "demo"\nnmae = "typo"\n', r"nmae: unknown key"),
    ('id = "n1"\n', 'id = "n1"\nport = 1\n', r"nodes\[0\]\.port: unknown key"),
    ('name = "demo"\n', '', r"name: missing"),
    ('name = "demo"', 'name = ""', r"name: expected a non-empty string"),
    ('version = 1', 'version = 0', r"version: expected a positive integer, got 0"),
    ('version = 1', 'version = -3', r"version: expected a positive integer, got -3"),
    ('version = 1', 'version = "1"', r"version: expected a positive integer, got '1'"),
    ('version = 1', 'version = 1.5', r"version: expected a positive integer, got 1.5"),
    ('version = 1', 'version = true', r"version: expected a positive integer, got True"),
    ('version = 1\n', '', r"version: missing"),
    ('replication_factor = 2', 'replication_factor = 0', r"replication_factor: expected a positive integer, got 0"),
    ('replication_factor = 2', 'replication_factor = 4',
     r"replication_factor: 4 is more than the 3 nodes listed"),
    ('replication_factor = 2\n', '', r"replication_factor: missing"),
    ('partitions = 256', 'partitions = 0', r"partitions: expected a positive integer, got 0"),
    ('partitions = 256', 'partitions = 65537', r"partitions: 65537 is not in 1\.\.65536"),
    ('partitions = 256', 'partitions = "256"', r"partitions: expected a positive integer, got '256'"),
    ('acks = "1"', 'acks = "2"', r"acks: '2' is not \"1\" or \"all\""),
    ('acks = "1"', 'acks = "ALL"', r"acks: 'ALL' is not \"1\" or \"all\""),
    ('acks = "1"', 'acks = 2', r"acks: 2 is not \"1\" or \"all\""),
    ('id = "n2"', 'id = "n1"', r"nodes\[1\]\.id: 'n1' is already the id of nodes\[0\]"),
    ('id = "n2"', 'id = " n2"', r"nodes\[1\]\.id: ' n2' must be printable, without surrounding spaces"),
    ('id = "n2"\n', '', r"nodes\[1\]\.id: missing"),
    ('address = "127.0.0.1:7452"', 'address = "127.0.0.1:7451"',
     r"nodes\[1\]\.address: '127.0.0.1:7451' is already the address of nodes\[0\]"),
    ('address = "127.0.0.1:7452"', 'address = "localhost"', r"nodes\[1\]\.address: 'localhost' is not host:port"),
    ('address = "127.0.0.1:7452"', 'address = ":7452"', r"nodes\[1\]\.address: ':7452' is not host:port"),
    ('address = "127.0.0.1:7452"', 'address = "h:0"', r"nodes\[1\]\.address: 'h:0': port '0' is not in 1\.\.65535"),
    ('address = "127.0.0.1:7452"', 'address = "h:70000"', r"port '70000' is not in 1\.\.65535"),
    ('address = "127.0.0.1:7452"', 'address = "h:http"', r"port 'http' is not in 1\.\.65535"),
    ('address = "127.0.0.1:7452"', 'address = "::1:7452"', r"write an IPv6 host in brackets"),
    ('address = "[::1]:7453"', 'address = "[::1]7453"', r"nodes\[2\]\.address: '\[::1\]7453' is not \[IPv6\]:port"),
    ('address = "[::1]:7453"', 'address = "[zz]:7453"', r"nodes\[2\]\.address: 'zz' is not an IPv6 address"),
    ('address = "127.0.0.1:7452"', 'address = "a b:1"', r"'a b' is not a host name or address"),
    ('address = "127.0.0.1:7452"', 'address = 7452', r"nodes\[1\]\.address: expected a non-empty string"),
]


@pytest.mark.parametrize("old,new,message", MISTAKES)
def test_each_mistake_is_one_error_naming_the_key(old, new, message):
    assert old in VALID
    with pytest.raises(ClusterFileError, match=message) as caught:
        ClusterFile.parse(VALID.replace(old, new, 1), source="cluster.toml")
    assert str(caught.value).startswith("cluster.toml: ")
    assert isinstance(caught.value, StemeError) and isinstance(caught.value, ValueError)


@pytest.mark.parametrize("table,message", [
    ("suspect_after = 0", r"replication\.suspect_after: expected a positive number of seconds, got 0"),
    ('down_after = "6"', r"replication\.down_after: expected a positive number of seconds, got '6'"),
    ("suspect_after = 7", r"expected heartbeat_interval < suspect_after < down_after, got 0.5, 7.0, 6.0"),
    ("anti_entropy_jitter = 1.0", r"replication\.anti_entropy_jitter: expected a fraction in \[0, 1\), got 1.0"),
    ("push_queue_bytes = 0", r"replication\.push_queue_bytes: expected a positive integer, got 0"),
    ("push_window = 0", r"replication\.push_window: expected a positive integer, got 0"),
    ("push_window = 65", r"replication\.push_window: expected 1\.\.64, got 65"),
    ("push_window = 1.5", r"replication\.push_window: expected a positive integer, got 1\.5"),
    ("gossip = true", r"replication\.gossip: unknown key"),
])
def test_replication_table_mistakes(table, message):
    with pytest.raises(ClusterFileError, match=message):
        ClusterFile.parse(VALID + f"[replication]\n{table}\n")


def test_structural_mistakes():
    base = VALID.split("[[nodes]]")[0]
    with pytest.raises(ClusterFileError, match=r"nodes: missing; add one \[\[nodes\]\] table"):
        ClusterFile.parse(base)
    with pytest.raises(ClusterFileError, match=r"nodes: no nodes listed"):
        ClusterFile.parse(base + "nodes = []\n")
    with pytest.raises(ClusterFileError, match=r"nodes: expected \[\[nodes\]\] tables"):
        ClusterFile.parse(base + 'nodes = ["n1"]\n')
    with pytest.raises(ClusterFileError, match=r"replication: expected a \[replication\] table"):
        ClusterFile.parse(base.replace('acks = "1"', 'acks = "1"\nreplication = 3') + VALID[len(base):])
    with pytest.raises(ClusterFileError, match=r"<cluster file>: not valid TOML"):
        ClusterFile.parse("name = ")


def test_load_reads_a_file_and_names_it(tmp_path):
    path = tmp_path / "cluster.toml"
    path.write_text(VALID)
    assert ClusterFile.load(path).source == str(path)
    with pytest.raises(ClusterFileError, match=r"cannot read the cluster file"):
        ClusterFile.load(tmp_path / "absent.toml")
    path.write_text(VALID.replace("version = 1", "version = 0"))
    with pytest.raises(ClusterFileError, match=rf"^{path}: version: expected a positive integer"):
        ClusterFile.load(path)


def test_parse_address_forms():
    assert parse_address("db.example:7451") == ("db.example", 7451)
    assert parse_address("[2001:db8::1]:1") == ("2001:db8::1", 1)
    with pytest.raises(ClusterFileError, match=r"seed: 'x' is not host:port"):
        parse_address("x", label="seed")


# ---------------------------------------------------------------- reloads


def bumped(text: str, version: int = 2) -> str:
    return text.replace("version = 1", f"version = {version}")


def test_compare_lists_added_removed_and_readdressed():
    old = ClusterFile.parse(VALID)
    text = bumped(VALID).replace('address = "127.0.0.1:7452"', 'address = "10.0.0.2:7452"')
    text = text.replace('id = "n3"', 'id = "n4"') + '[[nodes]]\nid = "n5"\naddress = "10.0.0.5:1"\n'
    change = compare(old, ClusterFile.parse(text))
    assert change.added == ("n4", "n5")
    assert change.removed == ("n3",)
    assert change.readdressed == ("n2",)
    assert change.placement_changed and not change.empty


def test_compare_same_file_is_empty_and_settings_are_seen():
    old = ClusterFile.parse(VALID)
    assert compare(old, ClusterFile.parse(VALID)).empty
    change = compare(old, ClusterFile.parse(bumped(VALID).replace('acks = "1"', 'acks = "all"')))
    assert change.acks_changed and not change.placement_changed
    change = compare(old, ClusterFile.parse(bumped(VALID) + "[replication]\ndown_after = 9\n"))
    assert change.settings_changed and not change.acks_changed
    change = compare(old, ClusterFile.parse(bumped(VALID).replace("replication_factor = 2",
                                                                  "replication_factor = 3")))
    assert change.replication_factor_changed and change.placement_changed


@pytest.mark.parametrize("text,message", [
    (VALID.replace('id = "n3"', 'id = "n4"'), r"version: still 1, but the file changed; bump the version"),
    (bumped(VALID, 2).replace('name = "demo"', 'name = "other"'),
     r"name: 'other', but this node is in cluster 'demo'"),
    (bumped(VALID, 2).replace("partitions = 256", "partitions = 512"),
     r"partitions: 512, but the cluster has 256; the partition count is fixed"),
])
def test_compare_refuses_bad_reloads(text, message):
    with pytest.raises(ClusterFileError, match=message):
        compare(ClusterFile.parse(VALID), ClusterFile.parse(text))


def test_compare_refuses_an_older_version():
    newer = ClusterFile.parse(bumped(VALID, 5))
    with pytest.raises(ClusterFileError, match=r"version: 1 is older than the running version 5"):
        compare(newer, ClusterFile.parse(VALID))
