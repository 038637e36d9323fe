"""What the package asks of its users' environments (issue 11, item 3).

- `pip install stemedb` is the client: records, signing, the codec and both
  clients. Importing `stemedb` or `stemedb.client` loads no engine, query,
  lens, server or replication module and none of numba, llvmlite, trio, h11
  or prometheus_client; the engine and the lenses load on first use of their
  names (`stemedb.open`, `stemedb.Recency`, …), and without the `server` extra
  that first use says which extra to install.
- The declared dependencies are the ones the code imports: the client's
  import closure needs only the core dependencies, everything else only the
  `server` extra, and nothing is pinned from above.
- Current trio and anyio: an error is reported as itself, not wrapped in the
  ExceptionGroup that strict task groups (trio >= 0.25, anyio 4) raise.

The wheel itself (manylinux tag, stripped extensions, a clean-venv install
with and without the extra) is checked by .ci/run.
"""

from __future__ import annotations

import ast
import importlib.metadata
import json
import os
import pathlib
import re
import socket
import subprocess
import sys

import anyio
import pytest
from test_imports import compiled_modules, module_files, resolve
from test_server_support import background_server

import stemedb
from stemedb import _extras
from stemedb.errors import NotFound, StemeError
from stemedb.server import ServerConfig, serve

try:
    import tomllib
except ModuleNotFoundError:  # pragma: no cover - Python 3.10
    import tomli as tomllib  # type: ignore[no-redef]

ROOT = pathlib.Path(__file__).resolve().parent.parent
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
SRC = pathlib.Path(stemedb.__file__).resolve().parent.parent  # the stemedb under test (CI: the wheel's)

# What the client must not load: the database itself and the server's dependencies.
NOT_IN_THE_CLIENT = ("stemedb.engine", "stemedb.query", "stemedb.lenses", "stemedb.server",
                     "stemedb.replication", "stemedb.cli", "numba", "llvmlite", "trio", "h11",
                     "prometheus_client")


def run_python(code: str, **env: str) -> subprocess.CompletedProcess[str]:
    environment = dict(os.environ, PYTHONPATH=str(SRC) + os.pathsep + os.environ.get("PYTHONPATH", ""),
                       **env)
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env=environment, timeout=120)


def loaded_after(statement: str) -> list[str]:
    """The modules a fresh interpreter holds after running `statement`."""
    result = run_python(f"{statement}\nimport json, sys\nprint(json.dumps(sorted(sys.modules)))")
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout.splitlines()[-1])


def is_under(module: str, prefixes: tuple[str, ...]) -> bool:
    return any(module == prefix or module.startswith(prefix + ".") for prefix in prefixes)


# ------------------------------------------------------------- importing the client


@pytest.mark.parametrize("statement", ["import stemedb", "import stemedb.client",
                                       "import stemedb.client.aio",
                                       "import stemedb; stemedb.connect; stemedb.Signer.generate()"])
def test_the_client_loads_no_engine_and_no_server_dependency(statement):
    loaded = loaded_after(statement)
    assert "stemedb.records" in loaded and "stemedb.errors" in loaded  # the statement did run
    assert [m for m in loaded if is_under(m, NOT_IN_THE_CLIENT)] == []


def test_stemedb_open_still_works_and_loads_the_engine_on_first_use(tmp_path):
    code = f"""
import sys
import stemedb
assert "stemedb.engine" not in sys.modules
open_ = stemedb.open
import stemedb.database
assert open_ is stemedb.database.open and stemedb.Database is stemedb.database.Database
with stemedb.open({str(tmp_path / "db")!r}) as db:
    claim = stemedb.Assertion("aspirin", "treats", stemedb.Ref("headache")).sign(stemedb.Signer.generate())
    db.put(claim)
    print(db.get(claim.id).object, len(db))
"""
    result = run_python(code)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == ["Ref('headache') 1"]


def test_every_public_name_resolves_to_its_defining_module():
    import stemedb.client
    import stemedb.database
    import stemedb.engine
    import stemedb.lenses
    import stemedb.query

    for name in stemedb.__all__:
        assert getattr(stemedb, name) is not None, name
    assert stemedb.open is stemedb.database.open and stemedb.Database is stemedb.database.Database
    assert stemedb.Writer is stemedb.engine.Writer
    assert stemedb.connect is stemedb.client.connect
    assert stemedb.connect_async is stemedb.client.connect_async
    assert stemedb.Resolution is stemedb.query.Resolution
    assert stemedb.lenses is stemedb.lenses and stemedb.Recency is stemedb.lenses.Recency
    assert stemedb.Constraints is stemedb.lenses.Constraints
    assert set(stemedb.__all__) <= set(dir(stemedb))
    assert len(set(stemedb.__all__)) == len(stemedb.__all__)


def test_star_import_gives_every_name_in_all():
    result = run_python("from stemedb import *\nprint(open.__module__, Recency.__name__, connect.__name__)")
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["stemedb.database", "Recency", "connect"]


def test_an_unknown_name_is_an_attribute_error():
    with pytest.raises(AttributeError, match="module 'stemedb' has no attribute 'Recencyy'"):
        stemedb.Recencyy  # noqa: B018 - the lookup is the test
    assert not hasattr(stemedb, "engine_of_everything")


WHOLE_STORE = ("stemedb.lenses._kernels (the whole-store calls: query_many, conflicts, materialize, "
               "trust ranks)")
QUERY_MANY = ("import tempfile\ndb = stemedb.open(tempfile.mkdtemp())\n"
              "db.put(stemedb.Assertion('s', 'p', 1).sign(stemedb.Signer.generate()))\n"
              "assert db.query('s', 'p').winner is not None\ndb.query_many([('s', 'p')])")


@pytest.mark.parametrize("blocked, statement, needed_by", [
    ("numba", QUERY_MANY, WHOLE_STORE),
    ("trio", "import stemedb.server", "stemedb.server"),
    ("prometheus_client", "import stemedb.server", "stemedb.server"),
])
def test_without_the_server_extra_the_error_names_the_extra(blocked, statement, needed_by):
    """As in a client-only install: the module cannot be imported (None in sys.modules)."""
    result = run_python(f"import sys\nsys.modules[{blocked!r}] = None\nimport stemedb\n{statement}")
    assert result.returncode == 1
    last = result.stderr.strip().splitlines()[-1]
    assert last == (f"ModuleNotFoundError: {needed_by} needs {blocked}, which the client-only install "
                    "(pip install stemedb) leaves out: pip install 'stemedb[server]'")


def test_lenses_and_single_queries_need_no_numba():
    # A single query runs stemedb._pair (compiled with the package): no numba is imported,
    # even with numba installed, until a whole-store call or the warm-up after a query.
    result = run_python("import sys\nimport stemedb, stemedb.query, tempfile\nstemedb.Recency\n"
                        "assert 'numba' not in sys.modules, 'importing the query engine loaded numba'\n"
                        "sys.modules['numba'] = None\n"
                        "db = stemedb.open(tempfile.mkdtemp())\n"
                        "db.put(stemedb.Assertion('s', 'p', 1).sign(stemedb.Signer.generate()))\n"
                        "print(db.query('s', 'p', lens=stemedb.Consensus()).winner.subject)\ndb.close()")
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["s"]


def test_a_missing_module_that_is_no_extra_is_reported_as_it_is():
    error = ModuleNotFoundError("No module named 'frobnicate'", name="frobnicate")
    _extras.explain(error, "stemedb.thing")  # returns: not one of ours, the caller re-raises it
    with pytest.raises(ModuleNotFoundError, match="stemedb.thing needs h11, which the client-only"):
        _extras.explain(ModuleNotFoundError("No module named 'h11'", name="h11"), "stemedb.thing")


# ------------------------------------------------------------ declared dependencies


def distribution(requirement: str) -> str:
    """The normalized distribution name of a requirement string (PEP 503)."""
    match = re.match(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)", requirement)
    assert match, requirement
    return re.sub(r"[-_.]+", "-", match.group(1)).lower()


def declared(*extras: str) -> set[str]:
    """The distributions the core dependencies and the given extras name."""
    project = PYPROJECT["project"]
    requirements = list(project["dependencies"])
    for extra in extras:
        requirements += project["optional-dependencies"][extra]
    return {distribution(r) for r in requirements}


def distributions_of(import_name: str) -> set[str]:
    """The distributions that provide a top-level import name (itself when none installed does)."""
    found = importlib.metadata.packages_distributions().get(import_name) or [import_name]
    return {re.sub(r"[-_.]+", "-", name).lower() for name in found}


def runtime_imports(path: pathlib.Path) -> list[ast.Import | ast.ImportFrom]:
    """Every import statement in a file, lazy ones included, except under `if TYPE_CHECKING:`."""
    found: list[ast.Import | ast.ImportFrom] = []

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            found.append(node)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(ast.parse(path.read_text(), filename=str(path)))
    return found


def dependencies_of(module: str, path: pathlib.Path, known: set[str]) -> tuple[set[str], set[str]]:
    """(stemedb modules, third-party top-level names) that `module` imports at run time."""
    own: set[str] = set()
    third_party: set[str] = set()

    def add(name: str) -> None:
        while name and name not in known:
            name = name.rpartition(".")[0]
        if name and name != module:
            own.add(name)

    for node in runtime_imports(path):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        else:
            target = resolve(module, path.name == "__init__.py", node)
            if target.startswith("stemedb.") or target == "stemedb":
                for alias in node.names:
                    submodule = f"{target}.{alias.name}"
                    add(submodule if submodule in known else target)
                continue
            names = [target]
        for name in names:
            top = name.partition(".")[0]
            if top == "stemedb":
                add(name)
            elif top and top != "__future__" and top not in sys.stdlib_module_names:
                third_party.add(top)
    return own, third_party


def closure(start: list[str]) -> tuple[set[str], set[str]]:
    """Every stemedb module reachable from `start` and the third-party names they import."""
    files = module_files()
    known = set(files) | compiled_modules()
    seen: set[str] = set()
    third_party: set[str] = set()
    todo = list(start)
    while todo:
        module = todo.pop()
        if module in seen:
            continue
        seen.add(module)
        if module not in files:
            continue  # a compiled module: a leaf
        own, outside = dependencies_of(module, files[module], known)
        third_party |= outside
        todo.extend(own)
    return seen, third_party


def test_the_client_needs_only_the_core_dependencies():
    """Lazy imports count: a client method importing the lenses would pull numba into the client."""
    modules, third_party = closure(["stemedb", "stemedb.client", "stemedb.client.aio"])
    assert {"stemedb.client.blocking", "stemedb.records", "stemedb._protocol"} <= modules
    # The cluster file's parser is the one replication module a client reads (failover over a
    # cluster's nodes); it imports only stemedb.errors and the standard library.
    assert sorted(m for m in modules if is_under(m, NOT_IN_THE_CLIENT)
                  and m != "stemedb.replication.cluster") == []
    needed = set().union(*(distributions_of(name) for name in third_party))
    assert needed == declared(), "the client's imports and the core dependencies differ"


def test_every_import_is_declared_by_the_core_or_the_server_extra():
    """Only the pure-Python reference used by the tests (stemedb._reference) needs the test extra."""
    files = module_files()
    known = set(files) | compiled_modules()
    missing = {}
    for module, path in files.items():
        allowed = declared("server", "test") if module == "stemedb._reference" else declared("server")
        if module == "stemedb.backup.objects":   # s3:// locations, with the archive extra
            allowed = declared("server", "archive")
        _own, third_party = dependencies_of(module, path, known)
        undeclared = {name for name in third_party if not distributions_of(name) & allowed}
        if undeclared:
            missing[module] = sorted(undeclared)
    assert missing == {}


def test_the_core_dependencies_leave_out_the_jit_and_the_server():
    assert declared() & {"numba", "llvmlite", "trio", "h11", "prometheus-client"} == set()
    assert {"numba", "trio", "h11", "prometheus-client"} <= declared("server")
    assert "stemedb" in {distribution(r) for r in PYPROJECT["project"]["optional-dependencies"]["test"]}


def test_no_dependency_is_pinned_from_above():
    project = PYPROJECT["project"]
    requirements = [*project["dependencies"], *sum(project["optional-dependencies"].values(), [])]
    pinned = [r for r in requirements if re.search(r"<|==|~=", r.split(";")[0])]
    assert pinned == []


def import_names_of(name: str) -> set[str]:
    """The top-level names a distribution provides (its own name when it is not installed)."""
    provided = {module for module, names in importlib.metadata.packages_distributions().items()
                if name in {re.sub(r"[-_.]+", "-", n).lower() for n in names}}
    return provided or {name.replace("-", "_")}


def test_the_missing_extra_error_knows_the_server_extra():
    server = declared("server") - declared()
    assert all(import_names_of(name) & _extras.SERVER_EXTRA_IMPORTS for name in server), server
    assert all(distributions_of(name) & server  # llvmlite is numba's, not ours to declare
               for name in _extras.SERVER_EXTRA_IMPORTS - {"llvmlite"})


# ---------------------------------------------------------- current trio and anyio


def test_serve_reports_a_startup_error_as_itself(tmp_path):
    """Strict nurseries wrapped the refused address in an ExceptionGroup the CLI could not print."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        address = f"127.0.0.1:{taken.getsockname()[1]}"
        with pytest.raises(StemeError, match=f"^{address}: address already in use$"):
            serve(tmp_path / "data", listen=address, http="")
    with stemedb.open(tmp_path / "data") as db:  # serve() closed the store it opened
        assert len(db) == 0


@pytest.mark.parametrize("backend", ["asyncio", "trio"])
def test_an_error_inside_async_with_connect_async_arrives_as_itself(tmp_path, backend):
    """anyio 4 task groups wrap what they are handed; the client's must not be handed the body's error."""
    async def scenario() -> None:
        async with stemedb.connect_async(server.url) as client:
            assert await client.ping() > 0
            await client.get(bytes(32))

    with background_server(tmp_path / "data", ServerConfig(listen="127.0.0.1:0", http=None)) as server:
        with pytest.raises(NotFound, match="^no record with ID 0{64}$"):
            anyio.run(scenario, backend=backend)
        with pytest.raises(KeyError, match="raised in the body"):
            anyio.run(raise_inside, server.url, backend=backend)


async def raise_inside(url: str) -> None:
    async with stemedb.connect_async(url):
        raise KeyError("raised in the body")
