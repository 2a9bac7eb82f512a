"""Uploads with bounded memory: lines are counted while the upload is read, an upload over
the line limit is refused naming the limit (before it is ever read whole), the JSON form of a
job has its own cap, and a stored file is downloaded a slice at a time.

Memory and time figures for a 200 MB upload come from `python -m bench.upload_memory`."""

from __future__ import annotations

import io
import json
import random
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime

import httpx
import pytest
from sqlalchemy.orm import Session, sessionmaker

from api import job_source
from api.job_source import Position
from api.jsonl import CHUNK_BYTES, NumberedLines, TooManyLines, count_lines, read_counted
from core.settings import Settings
from storage.openai_files import StoredFile, get_file, insert_streamed, new_file_id, stored_bytes
from storage.tables import Job, JobSource


def chat_line(custom_id: str, text: str) -> bytes:
    body = {"model": "tiny", "messages": [{"role": "user", "content": text}]}
    line = {"custom_id": custom_id, "method": "POST", "url": "/v1/chat/completions", "body": body}
    return json.dumps(line).encode() + b"\n"


def test_the_line_limit_is_counted_while_the_chunks_arrive() -> None:
    def chunks() -> Iterator[bytes]:
        yield b'{"a": 1}\n\n  \n{"a": 2}\n{"a"'  # a line split across chunks counts once
        yield b': 3}\n{"a": 4}\n'
        raise AssertionError("read past the chunk that broke the limit")

    with pytest.raises(TooManyLines, match="the limit is 3"):
        count_lines(chunks(), limit=3)
    assert count_lines([b"x", b"y\n", b" \n", b"\r\n", b"z"], limit=10) == 2


class Tracked(io.BytesIO):
    """A spooled upload that remembers how much of it was read."""

    def __init__(self, data: bytes) -> None:
        super().__init__(data)
        self.taken = 0

    def read(self, size: int | None = -1) -> bytes:
        data = super().read(size)
        self.taken += len(data)
        return data


def test_an_upload_over_the_limit_is_refused_before_it_is_read_whole() -> None:
    upload = Tracked(b"1\n" * (5 * CHUNK_BYTES))
    with pytest.raises(TooManyLines, match="the limit is 1000"):
        read_counted(upload, limit=1000)
    assert upload.taken <= CHUNK_BYTES
    within = Tracked(b'{"a": 1}\n' * 1000)
    assert read_counted(within, limit=1000) == within.getvalue()


def test_lines_are_numbered_as_uploaded_without_copying_them() -> None:
    data = b'\n{"a": 1}\r\n  \n\t{"b": 2}\n\n{"c": 3}'
    lines = NumberedLines(data)
    assert list(lines) == [(2, b'{"a": 1}\r'), (4, b'\t{"b": 2}'), (6, b'{"c": 3}')]
    assert lines[1:] == [(4, b'\t{"b": 2}'), (6, b'{"c": 3}')]
    assert len(lines) == count_lines([data], limit=3) == 3


class Fetches:
    """A source in hand, read as the database would be, remembering the most asked at once."""

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.most = 0

    def __call__(self, offset: int, length: int) -> bytes:
        self.most = max(self.most, length)
        return self.data[offset : offset + length]


def random_source(rng: random.Random) -> bytes:
    """Short and long lines, blank ones (some holding spaces, tabs or CR), maybe no final
    newline: what a slice boundary can fall in the middle of."""
    shapes = [b"", b"  ", b"\t\r", b'{"a": 1}', b'{"b": 2}\r', b" x", b"y" * 40]
    lines = [rng.choice(shapes) + str(i).encode() * rng.randint(0, 1) for i in range(60)]
    return b"\n".join(lines) + rng.choice([b"", b"\n", b"\n\n"])


def test_a_source_read_a_slice_at_a_time_has_the_lines_of_the_whole(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    rng = random.Random(7)
    for _ in range(200):
        data = random_source(rng)
        monkeypatch.setattr(job_source, "SLICE_BYTES", rng.randint(1, 50))
        whole = list(NumberedLines(data))
        fetch = Fetches(data)
        size = rng.randint(1, 7)
        chunks = list(job_source.chunks(fetch, size))
        assert [line for chunk in chunks for line in chunk.lines] == whole
        assert all(len(chunk.lines) == size for chunk in chunks[:-1])
        assert [chunk.more for chunk in chunks] == [True] * (len(chunks) - 1) + [False]
        assert fetch.most == job_source.SLICE_BYTES  # never the whole source at once
        index = rng.randint(0, len(whole))
        behind = chunks[rng.randint(0, len(chunks) - 1)].after  # a known position, maybe past
        at = job_source.seek(fetch, behind, index)
        assert at.index == index
        read = job_source.read(fetch, at, 3)
        assert read.lines == whole[index : index + 3]
        assert read.more == (index + 3 < len(whole))
        number = job_source.number_of(fetch, Position(), index)
        assert number == (whole[index][0] if index < len(whole) else None)


def test_a_stored_source_is_read_in_slices_from_the_database(
    sessions: sessionmaker[Session], tenant_id: uuid.UUID, monkeypatch: pytest.MonkeyPatch
) -> None:
    data = b"".join(chat_line(f"r{i}", "x " * i) for i in range(300)) + b"\n\n"
    monkeypatch.setattr(job_source, "SLICE_BYTES", 1000)  # lines cross most slice ends
    with sessions.begin() as session:
        job = Job(tenant_id=tenant_id, task="chat")
        session.add(job)
        session.flush()
        session.add(JobSource(job_id=job.id, content=data, format="openai", strict=False))
    with sessions() as session:
        fetch = job_source.stored(session, job.id)
        chunks = list(job_source.chunks(fetch, 128))
    assert [len(chunk.lines) for chunk in chunks] == [128, 128, 44]
    assert [line for chunk in chunks for line in chunk.lines] == list(NumberedLines(data))
    assert chunks[-1].after.offset == len(data) and not chunks[-1].more


def test_uploads_over_the_line_limit_are_refused_naming_it(
    client: httpx.Client, settings: Settings
) -> None:
    limit = settings.max_job_lines
    over = b"1\n" * (limit + 1)
    job = client.post(
        "/v1/jobs",
        data={"job": json.dumps({"task": "complete"})},
        files={"file": ("over.jsonl", over, "application/x-ndjson")},
    )
    assert job.status_code == 422 and f"the limit is {limit}" in job.text
    batch_file = client.post(
        "/v1/files",
        data={"purpose": "batch"},
        files={"file": ("over.jsonl", over, "application/x-ndjson")},
    )
    assert batch_file.status_code == 400, batch_file.text
    assert f"the limit is {limit}" in batch_file.json()["error"]["message"]
    assert client.get("/v1/files").json()["data"] == []
    listed = client.post("/v1/jobs", json={"task": "complete", "items": [1] * (limit + 1)})
    assert listed.status_code == 422 and f"the limit is {limit}" in listed.text
    assert client.get("/v1/jobs").json()["data"] == []


def test_a_json_job_over_its_cap_is_refused_before_it_is_parsed(
    client: httpx.Client, settings: Settings
) -> None:
    cap = settings.max_job_json_bytes
    items = b"1," * (cap // 2)
    body = b'{"task": "complete", "items": [' + items + b"1]}"
    response = client.post("/v1/jobs", content=body, headers={"content-type": "application/json"})
    assert response.status_code == 413, response.text
    assert f"over the limit of {cap} bytes" in response.json()["detail"]
    assert client.get("/v1/jobs").json()["data"] == []


def test_a_stored_file_downloads_whole_a_slice_at_a_time(client: httpx.Client) -> None:
    data = b"".join(chat_line(f"r{i}", "x " * 500) for i in range(9_000))  # about 9 MB
    assert len(data) > 2 * 4 * 1024 * 1024  # more than two download slices
    stored = client.post(
        "/v1/files",
        data={"purpose": "batch"},
        files={"file": ("big.jsonl", data, "application/x-ndjson")},
    )
    assert stored.status_code == 200, stored.text
    file_id = stored.json()["id"]
    assert stored.json()["bytes"] == len(data)
    with client.stream("GET", f"/v1/files/{file_id}/content") as response:
        received = b"".join(response.iter_bytes())
    assert received == data


def test_a_file_is_streamed_into_the_database_as_it_was_uploaded(
    sessions: sessionmaker[Session], tenant_id: uuid.UUID
) -> None:
    data = bytes(range(256)) * 5000  # every byte value, over more than one chunk
    chunks = [data[at : at + 300_000] for at in range(0, len(data), 300_000)]
    row = StoredFile(
        id=new_file_id(),
        tenant_id=tenant_id,
        filename="we\\ird\tname\n.jsonl",
        purpose="batch",
        size=len(data),
        created_at=datetime.now(UTC),
    )
    with sessions.begin() as session:
        insert_streamed(session, row, chunks)
    with sessions() as session:
        stored = get_file(session, tenant_id, row.id)
        assert stored is not None and stored.filename == "we\\ird\tname\n.jsonl"
        assert stored.content == data and stored_bytes(session, tenant_id) == len(data)
