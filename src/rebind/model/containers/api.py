"""An engine's API answer, parsed: HTTP status, Content-Length or chunked body, and the JSON
list, bounded in nesting before json.loads sees it.
"""

from __future__ import annotations

import re

# Docker's API socket answers HTTP; the answer is another process's bytes, read as root. Before
# json.loads sees it, it is bounded in size (by the reader), checked for its status, and checked
# for its nesting depth: json.loads recurses once per level, and "[" * 200000 raised
# RecursionError out of `rebind ls` (exit 70).

_JSON_STRING = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"')
_NOT_BRACKETS = bytes(c for c in range(256) if c not in b"[]{}")
_INNERMOST = re.compile(rb"\[\]|\{\}")


def json_nesting_problem(text: bytes, limit: int) -> str | None:
    """Why a JSON text must not reach json.loads ("deeper than LIMIT levels", "unbalanced"), or
    None. Linear passes in C: strings are blanked, everything but brackets dropped, then the
    innermost pairs removed once per level."""
    brackets = _JSON_STRING.sub(b'""', text).translate(None, _NOT_BRACKETS)
    for _ in range(limit):
        if not brackets:
            return None
        brackets, n = _INNERMOST.subn(b"", brackets)
        if n == 0:
            return "with unbalanced brackets"  # json.loads would fail (or first recurse) on it
    return f"nested deeper than {limit} levels" if brackets else None


def json_depth_within(text: bytes, limit: int) -> bool:
    """Do the brackets of a JSON text balance and nest at most ``limit`` deep?"""
    return json_nesting_problem(text, limit) is None


def _headers(raw: bytes) -> tuple[int, dict[bytes, bytes], int] | None:
    """(status, lower-cased headers, offset of the body) of an HTTP/1.x answer, or None."""
    head, sep, _ = raw.partition(b"\r\n\r\n")
    if not sep:
        return None
    lines = head.split(b"\r\n")
    parts = lines[0].split(None, 2)
    if len(parts) < 2 or not parts[0].startswith(b"HTTP/1.") or not parts[1].isdigit():
        return None
    headers: dict[bytes, bytes] = {}
    for line in lines[1:]:
        key, colon, value = line.partition(b":")
        if colon:
            headers[key.strip().lower()] = value.strip()
    return int(parts[1]), headers, len(head) + len(sep)


def content_end(raw: bytes) -> int | None:
    """Where an answer ends by its Content-Length (None: it ends when the server closes)."""
    h = _headers(raw)
    if h is None or b"chunked" in h[1].get(b"transfer-encoding", b"").lower():
        return None
    length = h[1].get(b"content-length", b"")
    return h[2] + int(length) if length.isdigit() and len(length) < 12 else None


def _dechunk(body: bytes) -> bytes | None:
    out = bytearray()
    at = 0
    while True:
        line_end = body.find(b"\r\n", at)
        if line_end < 0:
            return None
        size_text = body[at:line_end].split(b";", 1)[0].strip()
        try:
            size = int(size_text, 16)
        except ValueError:
            return None
        if size == 0:
            return bytes(out)
        start = line_end + 2
        if size < 0 or start + size > len(body):
            return None
        out += body[start : start + size]
        at = start + size + 2


def parse_api_answer(raw: bytes, max_depth: int) -> list[object] | str:
    """The JSON list an engine answered, or why it is not believed (one short line)."""
    import json

    h = _headers(raw)
    if h is None:
        return "answered no HTTP"
    status, headers, at = h
    if status != 200:
        return f"answered HTTP {status}"
    body: bytes | None = raw[at:]
    if b"chunked" in headers.get(b"transfer-encoding", b"").lower():
        body = _dechunk(raw[at:])
    else:
        end = content_end(raw)
        if end is not None:
            body = raw[at:end] if len(raw) >= end else None
    if body is None:
        return "answered an incomplete body"
    problem = json_nesting_problem(body, max_depth)
    if problem is not None:
        return f"answered JSON {problem}"
    try:
        doc = json.loads(body)
    except (ValueError, RecursionError):
        return "answered no valid JSON"
    return doc if isinstance(doc, list) else "answered JSON that is not a list"
