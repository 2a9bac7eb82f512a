"""JSONL uploads with bounded memory: lines are counted as they are read and found by offset.

An upload is counted chunk by chunk before anything else reads it, so a file of millions of
tiny lines is refused after its first chunk over the limit instead of being split into one
Python object per line. A file within the limit keeps its bytes once; its lines are offsets
into them (:class:`NumberedLines`), sliced out a chunk at a time by whoever parses them.

A line ends at ``\\n`` (JSON Lines); a ``\\r`` before it is whitespace to the JSON parser. A
line with nothing but whitespace is skipped, but counts in the numbering.
"""

from __future__ import annotations

import re
from array import array
from collections.abc import Iterable, Iterator, Sequence
from typing import BinaryIO, overload

from submission.prepare import BadRequest

CHUNK_BYTES = 1 << 20
_NONBLANK = re.compile(rb"[^\S\n]*\S[^\n]*")  # a line with something in it, from its start
_SOMETHING = re.compile(rb"\S")


class TooManyLines(BadRequest):
    """The upload has more lines than a job may hold; the message names the limit."""

    def __init__(self, limit: int) -> None:
        super().__init__(f"the upload has more than {limit} lines; the limit is {limit}")
        self.limit = limit


class LineCounter:
    """Counts the non-blank lines of a stream fed in chunks, refusing past ``limit``."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.lines = 0
        self._open = False  # the line in progress has something in it

    def feed(self, chunk: bytes) -> None:
        """Count the lines ``chunk`` completes.

        Raises:
            TooManyLines: the count passed the limit.
        """
        end = chunk.rfind(b"\n")
        if end < 0:
            self._open = self._open or _SOMETHING.search(chunk) is not None
            return
        first = chunk.find(b"\n")
        if self._open and _SOMETHING.search(chunk, 0, first) is None:
            self.lines += 1  # the line began in an earlier chunk and ends blank here
        self.lines += sum(1 for _ in _NONBLANK.finditer(chunk, 0, end))
        self._open = _SOMETHING.search(chunk, end + 1) is not None
        self._check()

    def close(self) -> int:
        """The count, the last line included."""
        if self._open:
            self.lines += 1
            self._open = False
        self._check()
        return self.lines

    def _check(self) -> None:
        if self.lines > self.limit:
            raise TooManyLines(self.limit)


def count_lines(chunks: Iterable[bytes], *, limit: int) -> int:
    """The non-blank lines in ``chunks``; raises :class:`TooManyLines` past ``limit``."""
    counter = LineCounter(limit)
    for chunk in chunks:
        counter.feed(chunk)
    return counter.close()


def chunks_of(data: bytes, size: int = CHUNK_BYTES) -> Iterable[bytes]:
    """``data`` in pieces of ``size`` bytes, one copied at a time."""
    view = memoryview(data)
    return (bytes(view[at : at + size]) for at in range(0, len(data), size))


def file_chunks(handle: BinaryIO) -> Iterator[bytes]:
    """A spooled upload from its start, a chunk at a time."""
    handle.seek(0)
    return iter(lambda: handle.read(CHUNK_BYTES), b"")


def read_counted(handle: BinaryIO, *, limit: int) -> bytes:
    """Count a spooled upload's lines a chunk at a time, then read it whole.

    Raises:
        TooManyLines: before the whole file was ever in memory.
    """
    count_lines(file_chunks(handle), limit=limit)
    handle.seek(0)
    return handle.read()


class NumberedLines(Sequence[tuple[int, bytes]]):
    """The non-blank lines of an upload as ``(number, raw)``, numbered from 1.

    Only three integers a line are kept; a line's bytes are sliced out when it is asked for,
    so a chunk of lines costs what that chunk holds and no more.
    """

    def __init__(self, data: bytes) -> None:
        self._data = data
        self._numbers = array("q")
        self._starts = array("q")
        self._ends = array("q")
        number, at = 1, 0
        for match in _NONBLANK.finditer(data):
            number += data.count(b"\n", at, match.start())
            at = match.start()
            self._numbers.append(number)
            self._starts.append(match.start())
            self._ends.append(match.end())

    def __len__(self) -> int:
        return len(self._numbers)

    @overload
    def __getitem__(self, index: int) -> tuple[int, bytes]: ...

    @overload
    def __getitem__(self, index: slice) -> list[tuple[int, bytes]]: ...

    def __getitem__(self, index: int | slice) -> tuple[int, bytes] | list[tuple[int, bytes]]:
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        return self._numbers[index], self._data[self._starts[index] : self._ends[index]]

    def start(self, index: int) -> int:
        """The byte offset where line ``index`` (counting from 0) starts: a reader a slice at
        a time resumes there."""
        return self._starts[index]


def numbered_lines(data: bytes) -> Sequence[tuple[int, bytes]]:
    """The non-blank lines of a JSONL upload with their line numbers (counting from 1)."""
    return NumberedLines(data)
