"""Type stubs for the compiled import-line scanner (ext/stemedb/_lines.pyx)."""

import mmap
from typing import Any

LINE_RECORD: int
LINE_OTHER: int

def scan(buffer: bytes | bytearray | memoryview | mmap.mmap, start: int, max_lines: int,
         final: bool) -> dict[str, Any]: ...
