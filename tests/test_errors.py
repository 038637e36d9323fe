"""The one error table (stemedb.errors) against docs/protocol.md, the codec and the clients.

The table in docs/protocol.md ("Errors") is parsed as markdown and compared
cell by cell with the error classes; stemedb._protocol's ERROR_CODES and E_
names must be the same table; every error class must be exported from
stemedb; and every exception the client modules raise must be one of the
classes of stemedb.errors (or a builtin for a wrong argument type or value).
"""

from __future__ import annotations

import ast
import builtins
import logging
import pathlib

import pytest

import stemedb
from stemedb import _protocol as P
from stemedb import errors
from stemedb.client._wire import error_from_frame
from stemedb.errors import ERROR_CLASSES, StemeError, error_from_code, refusal

ROOT = pathlib.Path(__file__).resolve().parent.parent
DOC = (ROOT / "docs" / "protocol.md").read_text()
YES_NO = {"yes": True, "no": False}


def markdown_table(after: str) -> list[dict[str, str]]:
    """The first markdown table after the line `after`, as one dict per row (by header)."""
    lines = DOC[DOC.index(after):].splitlines()[1:]
    start = next(i for i, line in enumerate(lines) if line.startswith("|"))
    table = []
    for line in lines[start:]:
        if not line.startswith("|"):
            break
        table.append([cell.strip() for cell in line.strip().strip("|").split("|")])
    header, rule, *rows = table
    assert all(set(cell) <= set("-: ") for cell in rule), rule
    return [dict(zip(header, row, strict=True)) for row in rows]


def error_classes() -> list[type[StemeError]]:
    """Every error class defined in stemedb.errors."""
    return [value for value in vars(errors).values()
            if isinstance(value, type) and issubclass(value, StemeError)
            and value.__module__ == "stemedb.errors"]


def test_the_documented_table_is_the_classes():
    rows = markdown_table("## Errors")
    documented = {int(row["code"]): (row["name"].strip("`"), row["class"].strip("`"),
                                     YES_NO[row["closes"]], YES_NO[row["retry-safe"]],
                                     int(row["HTTP"])) for row in rows}
    derived = {code: (cls.name, cls.__name__, cls.closes, cls.retry_safe, cls.http_status)
               for code, cls in ERROR_CLASSES.items()}
    assert documented == derived
    assert [int(row["code"]) for row in rows] == sorted(documented)


def test_wire_numbers_are_unchanged():
    """Drivers depend on these numbers: they are the ones of protocol version 1."""
    assert {code: cls.name for code, cls in ERROR_CLASSES.items()} == {
        1: "protocol", 2: "unsupported_version", 3: "frame_too_large", 4: "auth_required",
        5: "auth_failed", 6: "forbidden", 7: "rate_limited", 8: "quota_exceeded",
        9: "invalid_request", 10: "invalid_record", 11: "signature", 12: "not_found",
        13: "unsupported", 14: "storage_full", 15: "durability", 16: "corruption",
        17: "unavailable", 18: "too_many_connections", 19: "timeout", 20: "internal"}


def test_the_codec_table_is_derived_from_the_classes():
    assert P.ERROR_CODES == {code: (cls.name, cls.closes) for code, cls in ERROR_CLASSES.items()}
    for code, cls in ERROR_CLASSES.items():
        assert getattr(P, f"E_{cls.name.upper()}") == code
    assert P.FrameError is errors.FrameError and P.FrameTooLarge is errors.FrameTooLarge


def test_a_class_sharing_a_code_agrees_with_its_owner():
    for cls in error_classes():
        owner = ERROR_CLASSES[cls.code]
        assert (cls.name, cls.closes) == (owner.name, owner.closes), cls
    assert ERROR_CLASSES[errors.DatabaseClosed.code] is errors.Unavailable
    assert errors.DatabaseClosed.http_status == 503 and not errors.DatabaseClosed.retry_safe
    assert (errors.MethodNotAllowed.code, errors.MethodNotAllowed.http_status) == (9, 405)
    assert (errors.HeadersTooLarge.code, errors.HeadersTooLarge.http_status) == (3, 431)
    with pytest.raises(TypeError, match="error code 17 is Unavailable's"):
        type("Disagrees", (StemeError,), {"code": 17, "name": "elsewhere"})
    with pytest.raises(TypeError, match="agree on name and closes"):
        type("ClosesToo", (errors.Unavailable,), {"closes": True})


def test_every_error_class_is_exported_from_stemedb():
    for cls in error_classes():
        assert getattr(stemedb, cls.__name__) is cls, cls.__name__
        assert cls.__name__ in stemedb.__all__ and cls.__name__ in errors.__all__
        assert cls.__doc__, f"{cls.__name__} has no docstring saying what happened"


def raised_names(path: pathlib.Path) -> set[str]:
    """Names of the exception classes a module raises (`raise X(…)` and `raise X`)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Raise) and node.exc is not None:
            target = node.exc.func if isinstance(node.exc, ast.Call) else node.exc
            if isinstance(target, ast.Name) and target.id[:1].isupper():
                names.add(target.id)
    return names


@pytest.mark.parametrize("module", ["_wire.py", "blocking.py", "aio.py"])
def test_every_error_a_client_raises_is_a_stemedb_error(module):
    raised = raised_names(ROOT / "src" / "stemedb" / "client" / module)
    assert raised, "the walker found no raise at all"
    for name in raised:
        if hasattr(builtins, name):  # TypeError / ValueError for a wrong argument
            assert name in ("TypeError", "ValueError"), f"{module} raises {name}"
            continue
        assert name in errors.__all__ and issubclass(getattr(stemedb, name), StemeError), \
            f"{module} raises {name}, which is not an error class of stemedb.errors"


@pytest.mark.parametrize("code", sorted(ERROR_CLASSES))
def test_a_client_raises_the_class_that_owns_the_code(code):
    error = error_from_frame(P.encode_error(code, 1500, "why"))
    assert type(error) is ERROR_CLASSES[code]
    assert str(error) == "why" and error.retry_after == 1.5


def test_an_unknown_code_is_a_plain_stemeerror_that_says_so():
    error = error_from_code(99, "new trouble", 0.0)
    assert type(error) is StemeError and str(error) == "new trouble (error code 99, which this client does not know)"


def test_refusal_of_an_unexpected_exception_is_internal_and_logged(caplog):
    with caplog.at_level(logging.ERROR, logger="stemedb"):
        answer = refusal(RuntimeError("secret detail"))
    assert (answer.error, answer.code, answer.http_status) == (StemeError, 20, 500)
    assert answer.message == "internal error (RuntimeError); see the server log"
    assert [r.exc_info[1].args for r in caplog.records if r.exc_info] == [("secret detail",)]


def test_refusal_takes_code_and_status_from_the_class_not_the_message():
    closed = refusal(StemeError("/data: the database is closed"))
    assert (closed.name, closed.http_status) == ("internal", 500)
    closed = refusal(errors.DatabaseClosed("/data: the database is closed"))
    assert (closed.code, closed.name, closed.http_status, closed.closes) == (17, "unavailable", 503, False)
    frame = refusal(errors.FrameTooLarge("too big", request_id=7))
    assert (frame.code, frame.http_status, frame.closes) == (3, 413, True)
    limited = refusal(errors.QuotaExceeded("slow", retry_after=2.5))
    assert (limited.code, limited.retry_after) == (8, 2.5)
