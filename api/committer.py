"""Group commit for the API: concurrent submissions share one transaction and one publish.

Each handler validates its own request, then hands it here and waits. One thread takes
whatever has queued up since its last commit, inserts it all, commits, publishes, and releases
the handlers. Under load that is one commit for many requests; alone, a request waits for
nobody. The order is unchanged: nothing is published before its row is committed.
"""

from __future__ import annotations

import queue
import threading
from concurrent.futures import Future
from dataclasses import dataclass, field

from storage.tables import Request
from submission.prepare import Prepared
from submission.services import Services
from submission.submit import submit_many

Submitted = tuple[Request, bool]


@dataclass(slots=True)
class _Pending:
    prepared: Prepared
    future: Future[Submitted] = field(default_factory=Future)


class GroupCommitter:
    def __init__(self, services: Services, *, max_group: int = 256) -> None:
        self._services = services
        self._max_group = max_group
        self._queue: queue.SimpleQueue[_Pending | None] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._loop, name="inferq-committer", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._queue.put(None)
        self._thread.join(30)

    def submit(self, prepared: Prepared) -> Future[Submitted]:
        """Queue one request for the next group commit.

        Raises:
            TooBusy: a limit is reached (submission.limits); nothing was queued.
        """
        if self._services.limits is not None:
            self._services.limits.admit([prepared])
        pending = _Pending(prepared)
        self._queue.put(pending)
        return pending.future

    def _loop(self) -> None:
        while (first := self._queue.get()) is not None:
            group = [first]
            while len(group) < self._max_group:
                try:
                    item = self._queue.get_nowait()
                except queue.Empty:
                    break
                if item is None:
                    self._commit(group)
                    return
                group.append(item)
            self._commit(group)

    def _commit(self, group: list[_Pending]) -> None:
        try:
            results = submit_many(self._services, [p.prepared for p in group])
        except Exception as exc:
            if len(group) == 1:
                group[0].future.set_exception(exc)
                return
            # One bad request (say, an idempotency key raced) must not fail its neighbours:
            # halve the group until it fails alone, a few commits rather than one per request.
            # (Values Postgres refuses are refused before they get here: submission.storable.)
            half = len(group) // 2
            self._commit(group[:half])
            self._commit(group[half:])
            return
        for pending, result in zip(group, results, strict=True):
            pending.future.set_result(result)
