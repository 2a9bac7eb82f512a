"""A job source's lines, read from Postgres a slice at a time.

A source may be 200 MB; fetched whole, the driver alone holds it several times over. Admission
keeps only a :class:`Position` between chunks (which line, at which byte, on which line number)
and reads from there a slice of :data:`SLICE_BYTES` at a time, extended while a line crosses
its end, split with :class:`api.jsonl.NumberedLines`, so lines are counted and numbered as
everywhere else: a blank line is skipped but numbered. A position is only ever found by walking
forward, from a known one or from the start, so it never depends on who admitted the lines.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from sqlalchemy.orm import Session

from api.jsonl import NumberedLines
from storage.openai_files import content_slice
from storage.tables import JobSource

SLICE_BYTES = 4 << 20
Fetch = Callable[[int, int], bytes]  # (offset, length): the source's bytes there, b"" past its end
Line = tuple[int, bytes]  # a non-blank line's number (counting every line from 1) and its bytes


@dataclass(frozen=True, slots=True)
class Position:
    """Where non-blank line ``index`` (counting from 0) is looked for: from byte ``offset``,
    which is on line ``number``."""

    index: int = 0
    offset: int = 0
    number: int = 1


@dataclass(frozen=True, slots=True)
class Read:
    lines: list[Line]
    after: Position  # where the next line is looked for
    more: bool  # a non-blank line is left after these


def stored(session: Session, job_id: uuid.UUID) -> Fetch:
    """The job's source as stored, read inside ``session`` (whose lock on it is held)."""
    row = JobSource.job_id == job_id
    return lambda offset, length: content_slice(session, JobSource.content, row, offset, length)


def in_hand(data: bytes) -> Fetch:
    """The source from the upload still in hand, not read back."""
    return lambda offset, length: data[offset : offset + length]


def read(fetch: Fetch, at: Position, count: int) -> Read:
    """Up to ``count`` lines from ``at``."""
    lines: list[Line] = []
    while len(lines) < count:
        body = _body(fetch, at.offset)
        if not body:
            return Read(lines, at, more=False)
        numbered = NumberedLines(body)
        taken = min(count - len(lines), len(numbered))
        lines += [(at.number - 1 + number, raw) for number, raw in numbered[:taken]]
        if taken < len(numbered):
            return Read(lines, _after(at, body, numbered, taken), more=True)
        at = _after(at, body, numbered, taken)
    return Read(lines, at, more=_any_left(fetch, at))


def chunks(fetch: Fetch, size: int) -> Iterator[Read]:
    """The whole source from its start, ``size`` lines at a time."""
    chunk = Read([], Position(), more=True)
    while chunk.more:
        chunk = read(fetch, chunk.after, size)
        yield chunk


def number_of(fetch: Fetch, at: Position, index: int) -> int | None:
    """The number of line ``index`` (None past the last), walked to from ``at``."""
    lines = read(fetch, seek(fetch, at, index), 1).lines
    return lines[0][0] if lines else None


def seek(fetch: Fetch, at: Position, index: int) -> Position:
    """The position of line ``index``, walked to from ``at`` (from the start if ``at`` is past
    it), holding one slice at a time."""
    if at.index > index:
        at = Position()
    while at.index < index:
        body = _body(fetch, at.offset)
        if not body:
            break  # fewer lines than that: the position is the end
        numbered = NumberedLines(body)
        at = _after(at, body, numbered, min(index - at.index, len(numbered)))
    return at


def _any_left(fetch: Fetch, at: Position) -> bool:
    while body := _body(fetch, at.offset):
        if body.strip():
            return True
        at = Position(at.index, at.offset + len(body), at.number + body.count(b"\n"))
    return False


def _after(at: Position, body: bytes, numbered: NumberedLines, taken: int) -> Position:
    """The position past the first ``taken`` of the lines of ``body``, which starts at ``at``."""
    if taken == len(numbered):
        return Position(at.index + taken, at.offset + len(body), at.number + body.count(b"\n"))
    number, _ = numbered[taken]
    return Position(at.index + taken, at.offset + numbered.start(taken), at.number - 1 + number)


def _body(fetch: Fetch, offset: int) -> bytes:
    """The source from ``offset`` to the end of the last line that ends within a slice (of the
    line, if it is longer than a slice; of the source, at its end); b"" past the end."""
    grown = bytearray()
    piece = fetch(offset, SLICE_BYTES)
    while len(piece) == SLICE_BYTES:  # the source goes on
        end = piece.rfind(b"\n")
        if end >= 0:
            return bytes(grown) + piece[: end + 1]
        grown += piece
        piece = fetch(offset + len(grown), SLICE_BYTES)
    return bytes(grown) + piece
