"""Import lines read natively: the export lines of a JSON Lines file, checked without Python objects.

Owns: cutting a block of a file into lines and recognising, for each, the
line `stemedb export` writes — one JSON object whose `raw` member is a
record's bytes in base64 and whose `id` member, if present, is 64 hex
digits (or null) — checking that the whole line is well-formed JSON,
decoding `raw` into one blob of records and `id` into a claimed ID. This is
the common line of an import, and the Python path spent most of an import
building dicts of every line's readable fields only to read two of them.

Must never: accept a line that the JSON parser of the Python path (orjson,
or json) would refuse, or read a line differently from it. The check is
therefore a strict subset of JSON: anything outside the subset — a member
name with escapes at the top level (it might spell `raw`), `raw` or `id`
given twice or with escapes, a surrogate \\u escape, a number that could
overflow a double (over 20 integer digits, or an exponent over 2 digits),
nesting deeper than MAX_DEPTH, base64 that is not canonical — makes the line
LINE_OTHER, and the Python path parses it and decides, with its own message
for what is wrong. The subset never raises.

Lines are split at b"\\n" as readlines splits them; a line is blank, and
skipped, when with its newline it is at most two bytes of ASCII whitespace
(what the Python path skips). The scan runs without the GIL.
"""

from cpython.object cimport PyObject
from cpython.ref cimport Py_DECREF
from libc.stdint cimport int64_t, uint8_t, uint64_t
from libc.string cimport memchr, memcmp, memcpy

import numpy as np


cdef extern from "Python.h":
    # as bare pointers: the blob is written, then shrunk in place, before Python sees it
    PyObject* new_bytes "PyBytes_FromStringAndSize" (const char* data, Py_ssize_t size)
    char* bytes_data "PyBytes_AS_STRING" (PyObject* bytes) nogil
    int _PyBytes_Resize(PyObject** bytes, Py_ssize_t size)

cdef enum:
    LINE_RECORD_ = 0      # an export line: `raw` decoded into the blob, `id` into claims
    LINE_OTHER_ = 1       # anything else: the Python path parses it
    MAX_DEPTH = 64        # containers nested deeper are left to the Python path
    MAX_INT_DIGITS = 20   # integer digits of a number the subset accepts (no overflow)
    MAX_EXP_DIGITS = 2    # exponent digits likewise
    ID_HEX = 64

LINE_RECORD = LINE_RECORD_
LINE_OTHER = LINE_OTHER_

# top-level members the scan looks for
cdef enum:
    MEMBER_NONE = 0
    MEMBER_RAW = 1
    MEMBER_ID = 2

cdef enum:
    S_KEY_OR_CLOSE = 0    # just after '{'
    S_KEY = 1             # after ',' in an object
    S_VALUE = 2           # after ':' or ',' in an array
    S_VALUE_OR_CLOSE = 3  # just after '['
    S_AFTER = 4           # after a value

cdef uint8_t B64[256]
cdef uint8_t HEX[256]
cdef uint8_t PLAIN[256]     # 1: a byte that stands for itself inside a string (ASCII, no '"', '\\', control)


cdef void _tables() noexcept:
    cdef int i
    cdef bytes alphabet = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
    for i in range(256):
        B64[i] = 0xFF
        HEX[i] = 0xFF
    for i in range(64):
        B64[alphabet[i]] = i
    for i in range(256):
        PLAIN[i] = 1 if 0x20 <= i < 0x80 and i != 34 and i != 92 else 0
    for i in range(10):
        HEX[48 + i] = i
    for i in range(6):
        HEX[97 + i] = 10 + i
        HEX[65 + i] = 10 + i


_tables()


cdef struct Members:
    Py_ssize_t raw_start, raw_end      # the raw string's contents, or raw_start = -1
    Py_ssize_t id_start, id_end        # the id string's contents, or id_start = -1
    int raw_seen, id_seen


cdef inline Py_ssize_t skip_space(const uint8_t* p, Py_ssize_t i, Py_ssize_t n) noexcept nogil:
    while i < n and (p[i] == 32 or p[i] == 9 or p[i] == 10 or p[i] == 13):
        i += 1
    return i


cdef inline int utf8_length(const uint8_t* p, Py_ssize_t i, Py_ssize_t n) noexcept nogil:
    """Bytes of the well-formed UTF-8 sequence at p[i] (lead byte ≥ 0x80), or 0."""
    cdef uint8_t c = p[i], lo = 0x80, hi = 0xBF
    cdef int k
    if 0xC2 <= c <= 0xDF:
        k = 2
    elif 0xE0 <= c <= 0xEF:
        k = 3
        if c == 0xE0:
            lo = 0xA0
        elif c == 0xED:
            hi = 0x9F          # no surrogates
    elif 0xF0 <= c <= 0xF4:
        k = 4
        if c == 0xF0:
            lo = 0x90
        elif c == 0xF4:
            hi = 0x8F          # nothing above U+10FFFF
    else:
        return 0
    if i + k > n or not (lo <= p[i + 1] <= hi):
        return 0
    if k >= 3 and not (0x80 <= p[i + 2] <= 0xBF):
        return 0
    if k == 4 and not (0x80 <= p[i + 3] <= 0xBF):
        return 0
    return k


cdef inline uint64_t special(uint64_t x) noexcept nogil:
    """Nonzero when one of the 8 bytes of x is not PLAIN (< 0x20, '"', '\\' or ≥ 0x80).

    The word-at-a-time tests of "some byte is zero / less than n": exact in
    whether any byte matches (a false positive only costs the byte loop)."""
    cdef uint64_t ones = 0x0101010101010101ULL
    cdef uint64_t quote = x ^ (ones * 0x22)
    cdef uint64_t backslash = x ^ (ones * 0x5C)
    return (((x - ones * 0x20) & ~x) | ((quote - ones) & ~quote) | ((backslash - ones) & ~backslash)
            | x) & (ones * 0x80)


cdef Py_ssize_t scan_string(const uint8_t* p, Py_ssize_t i, Py_ssize_t n, int* escaped) noexcept nogil:
    """p[i] is '"': the index just past the closing quote, or -1 outside the subset."""
    cdef uint8_t c, e
    cdef int k, v, h
    cdef uint64_t word
    escaped[0] = 0
    i += 1
    while i < n:
        while i + 8 <= n:
            memcpy(&word, p + i, 8)
            if special(word):
                break
            i += 8
        while i < n and PLAIN[p[i]]:
            i += 1
        if i >= n:
            return -1
        c = p[i]
        if c == 34:
            return i + 1
        if c == 92:
            escaped[0] = 1
            if i + 1 >= n:
                return -1
            e = p[i + 1]
            if e == 34 or e == 92 or e == 47 or e == 98 or e == 102 or e == 110 or e == 114 or e == 116:
                i += 2
                continue
            if e != 117 or i + 6 > n:      # \uXXXX
                return -1
            v = 0
            for k in range(4):
                h = HEX[p[i + 2 + k]]
                if h == 0xFF:
                    return -1
                v = v * 16 + h
            if 0xD800 <= v <= 0xDFFF:     # surrogates: pairs and strays are the Python path's
                return -1
            i += 6
            continue
        if c < 0x20:
            return -1
        if c < 0x80:
            i += 1
            continue
        k = utf8_length(p, i, n)
        if k == 0:
            return -1
        i += k
    return -1


cdef Py_ssize_t scan_number(const uint8_t* p, Py_ssize_t i, Py_ssize_t n) noexcept nogil:
    cdef Py_ssize_t first
    if p[i] == 45:   # '-'
        i += 1
    if i >= n:
        return -1
    if p[i] == 48:   # a lone leading zero
        i += 1
    elif 49 <= p[i] <= 57:
        first = i
        while i < n and 48 <= p[i] <= 57:
            i += 1
        if i - first > MAX_INT_DIGITS:
            return -1
    else:
        return -1
    if i < n and p[i] == 46:   # '.'
        i += 1
        first = i
        while i < n and 48 <= p[i] <= 57:
            i += 1
        if i == first:
            return -1
    if i < n and (p[i] == 101 or p[i] == 69):   # 'e' 'E'
        i += 1
        if i < n and (p[i] == 43 or p[i] == 45):
            i += 1
        first = i
        while i < n and 48 <= p[i] <= 57:
            i += 1
        if i == first or i - first > MAX_EXP_DIGITS:
            return -1
    return i


cdef inline bint literal(const uint8_t* p, Py_ssize_t i, Py_ssize_t n, const char* word,
                         Py_ssize_t size) noexcept nogil:
    return i + size <= n and memcmp(p + i, word, size) == 0


cdef bint check_object(const uint8_t* p, Py_ssize_t n, Members* m) noexcept nogil:
    """Whether p[0:n] is one JSON object in the subset with a string `raw`; its members' spans."""
    cdef uint8_t stack[MAX_DEPTH]
    cdef int depth = 0, state, member = MEMBER_NONE, escaped
    cdef Py_ssize_t i, j, size
    cdef uint8_t c
    m.raw_start = m.id_start = -1
    m.raw_end = m.id_end = -1
    m.raw_seen = m.id_seen = 0
    i = skip_space(p, 0, n)
    if i >= n or p[i] != 123:
        return False
    stack[0] = 123
    depth = 1
    i += 1
    state = S_KEY_OR_CLOSE
    while True:
        i = skip_space(p, i, n)
        if i >= n:
            return False
        c = p[i]
        if (state == S_KEY_OR_CLOSE and c == 125) or (state == S_VALUE_OR_CLOSE and c == 93):
            state = S_AFTER       # an empty container closes as one does after a value
        if state == S_KEY_OR_CLOSE or state == S_KEY:
            if c != 34:
                return False
            j = scan_string(p, i, n, &escaped)
            if j < 0:
                return False
            member = MEMBER_NONE
            if depth == 1:
                if escaped:
                    return False
                size = j - i - 2
                if size == 3 and memcmp(p + i + 1, b"raw", 3) == 0:
                    member = MEMBER_RAW
                elif size == 2 and memcmp(p + i + 1, b"id", 2) == 0:
                    member = MEMBER_ID
            i = skip_space(p, j, n)
            if i >= n or p[i] != 58:
                return False
            i += 1
            state = S_VALUE
            continue
        if state == S_VALUE or state == S_VALUE_OR_CLOSE:
            if c == 123 or c == 91:
                if member != MEMBER_NONE or depth >= MAX_DEPTH:
                    return False
                stack[depth] = c
                depth += 1
                i += 1
                state = S_KEY_OR_CLOSE if c == 123 else S_VALUE_OR_CLOSE
                continue
            if c == 34:
                j = scan_string(p, i, n, &escaped)
                if j < 0:
                    return False
                if member == MEMBER_RAW:
                    if m.raw_seen or escaped:
                        return False
                    m.raw_seen = 1
                    m.raw_start = i + 1
                    m.raw_end = j - 1
                elif member == MEMBER_ID:
                    if m.id_seen or escaped:
                        return False
                    m.id_seen = 1
                    m.id_start = i + 1
                    m.id_end = j - 1
                i = j
            elif c == 110 and literal(p, i, n, b"null", 4):
                if member == MEMBER_RAW:
                    return False
                if member == MEMBER_ID:
                    if m.id_seen:
                        return False
                    m.id_seen = 1
                i += 4
            elif member != MEMBER_NONE:
                return False          # raw or id of another type: the Python path names it
            elif c == 116 and literal(p, i, n, b"true", 4):
                i += 4
            elif c == 102 and literal(p, i, n, b"false", 5):
                i += 5
            elif c == 45 or 48 <= c <= 57:
                i = scan_number(p, i, n)
                if i < 0:
                    return False
            else:
                return False
            member = MEMBER_NONE
            state = S_AFTER
            continue
        # S_AFTER
        if c == 44:
            i += 1
            state = S_KEY if stack[depth - 1] == 123 else S_VALUE
            continue
        if (c == 125 and stack[depth - 1] == 123) or (c == 93 and stack[depth - 1] == 91):
            depth -= 1
            i += 1
            if depth == 0:
                break
            continue
        return False
    return skip_space(p, i, n) == n and m.raw_seen == 1


cdef Py_ssize_t base64_decode(const uint8_t* s, Py_ssize_t n, uint8_t* out) noexcept nogil:
    """Canonical base64 (padded, zero trailing bits) into out; its length, or -1."""
    cdef Py_ssize_t i, o = 0, groups
    cdef int pad = 0
    cdef uint8_t a, b, c, d
    if n == 0 or n % 4:
        return -1
    if s[n - 1] == 61:
        pad = 2 if s[n - 2] == 61 else 1
    groups = n // 4 - (1 if pad else 0)
    for i in range(groups):
        a = B64[s[4 * i]]
        b = B64[s[4 * i + 1]]
        c = B64[s[4 * i + 2]]
        d = B64[s[4 * i + 3]]
        if (a | b | c | d) & 0xC0:
            return -1
        out[o] = (a << 2) | (b >> 4)
        out[o + 1] = ((b & 15) << 4) | (c >> 2)
        out[o + 2] = ((c & 3) << 6) | d
        o += 3
    if pad:
        i = n - 4
        a = B64[s[i]]
        b = B64[s[i + 1]]
        if (a | b) & 0xC0:
            return -1
        out[o] = (a << 2) | (b >> 4)
        o += 1
        if pad == 1:
            c = B64[s[i + 2]]
            if c & 0xC0 or c & 3:
                return -1
            out[o] = ((b & 15) << 4) | (c >> 2)
            o += 1
        elif b & 15:
            return -1
    return o


cdef bint hex_decode(const uint8_t* s, uint8_t* out) noexcept nogil:
    cdef int i
    cdef uint8_t hi, lo
    for i in range(ID_HEX // 2):
        hi = HEX[s[2 * i]]
        lo = HEX[s[2 * i + 1]]
        if hi == 0xFF or lo == 0xFF:
            return False
        out[i] = (hi << 4) | lo
    return True


cdef inline bint blank(const uint8_t* p, Py_ssize_t start, Py_ssize_t stop) noexcept nogil:
    """Whether line p[start:stop] (its newline included) is one the Python path skips."""
    cdef Py_ssize_t i
    if stop - start > 2:
        return False
    for i in range(start, stop):
        if not (p[i] == 32 or 9 <= p[i] <= 13):
            return False
    return True


def scan(buffer, Py_ssize_t start, Py_ssize_t max_lines, bint final):
    """The first `max_lines` lines of `buffer` (bytes) from offset `start`, or all its complete ones.

    A last line without its newline counts only when `final`. Returns a dict:
      consumed  bytes of buffer the lines take (newlines included), from `start`
      lines     lines taken, blank ones included
      kinds     per non-blank line, LINE_RECORD or LINE_OTHER (uint8)
      index     its index among the lines taken, from 0 (int64)
      starts, ends  its span in buffer, newline excluded (int64)
      blob, offsets the LINE_RECORD lines' decoded raws: blob[offsets[r]:offsets[r+1]]
      claims    (records, 32) uint8: each one's `id`, where claimed[r] is 1
      claimed   uint8 per record
    """
    cdef const uint8_t[::1] view = buffer
    cdef Py_ssize_t size = view.shape[0]
    cdef const uint8_t* p = &view[0] if size else NULL
    if not 0 <= start <= size:
        raise ValueError(f"start {start} is outside the buffer of {size} bytes")
    cdef Py_ssize_t position = start, stop, taken = 0, records = 0, written = 0, length
    cdef const uint8_t* newline
    cdef Py_ssize_t lines = 0, row
    # pass 1: how many lines, and where they end
    with nogil:
        while taken < max_lines and position < size:
            newline = <const uint8_t*>memchr(p + position, 10, size - position)
            if newline == NULL:
                if not final:
                    break
                stop = size
            else:
                stop = newline - p + 1
            taken += 1
            if not blank(p, position, stop):
                lines += 1
            position = stop
    kinds = np.empty(lines, dtype=np.uint8)
    index = np.empty(lines, dtype=np.int64)
    starts = np.empty(lines, dtype=np.int64)
    ends = np.empty(lines, dtype=np.int64)
    cdef uint8_t[::1] kv = kinds
    cdef int64_t[::1] iv = index, sv = starts, ev = ends
    # pass 2: the non-blank lines' spans
    cdef Py_ssize_t line = 0, at = start
    with nogil:
        row = 0
        while line < taken:
            newline = <const uint8_t*>memchr(p + at, 10, position - at)
            stop = position if newline == NULL else newline - p + 1
            if not blank(p, at, stop):
                iv[row] = line
                sv[row] = at
                ev[row] = stop - 1 if p[stop - 1] == 10 else stop
                row += 1
            line += 1
            at = stop
    offsets = np.zeros(lines + 1, dtype=np.int64)
    claims = np.zeros((lines, 32), dtype=np.uint8)
    claimed = np.zeros(lines, dtype=np.uint8)
    cdef uint8_t[::1] cv = claimed
    cdef uint8_t[:, ::1] claimv = claims
    cdef int64_t[::1] offv = offsets
    cdef Members m
    # The decoded raws go straight into a bytes object, shrunk to size at the end (no copy);
    # nothing between its allocation and the shrink can raise.
    cdef PyObject* raw = new_bytes(NULL, (position - start) * 3 // 4 + 4)
    if raw == NULL:
        raise MemoryError()
    cdef uint8_t* ov = <uint8_t*>bytes_data(raw)
    with nogil:
        for row in range(lines):
            kv[row] = LINE_OTHER_
            if not check_object(p + sv[row], ev[row] - sv[row], &m):
                continue
            if m.id_start >= 0:
                if m.id_end - m.id_start != ID_HEX or not hex_decode(p + sv[row] + m.id_start,
                                                                       &claimv[records, 0]):
                    continue
            length = base64_decode(p + sv[row] + m.raw_start, m.raw_end - m.raw_start,
                                   ov + written)
            if length <= 0:
                continue
            cv[records] = 1 if m.id_start >= 0 else 0
            written += length
            records += 1
            offv[records] = written
            kv[row] = LINE_RECORD_
    if _PyBytes_Resize(&raw, written) < 0:   # (it frees the object on failure)
        raise MemoryError()
    blob = <object>raw
    Py_DECREF(blob)                           # the reference new_bytes gave us; blob holds one
    return {"consumed": position - start, "lines": taken, "kinds": kinds, "index": index,
            "starts": starts, "ends": ends, "blob": blob,
            "offsets": offsets[:records + 1].copy(), "claims": claims[:records].copy(),
            "claimed": claimed[:records].copy()}
