"""Long polls per tenant: ``?wait=`` reads and chat completions that wait for their result.

A waiting caller costs no thread (the wait is async polling with backoff on the event loop),
but it holds a connection and a slot here, and each check is a database read. One tenant may
hold at most ``max_waits_per_tenant`` of them in an API process; one more is answered 429 at
once, so a tenant opening thousands of long polls cannot crowd out the others.
"""

from __future__ import annotations

import uuid
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager

from submission.limits import TooBusy

RETRY_AFTER_S = 1


class WaitSlots:
    """Counts long polls per tenant; built once per API process (touched from its event loop
    only, so no lock)."""

    def __init__(self, limit: int) -> None:
        self._limit = limit
        self._held: Counter[uuid.UUID] = Counter()

    @contextmanager
    def hold(self, tenant_id: uuid.UUID) -> Iterator[None]:
        """Hold a slot for the block.

        Raises:
            TooBusy: The tenant already holds ``limit`` slots; nothing was held.
        """
        if self._held[tenant_id] >= self._limit:
            raise TooBusy(
                f"this tenant already has {self._held[tenant_id]} long polls waiting; the "
                f"limit is {self._limit} (max_waits_per_tenant). Poll without wait, or retry "
                "when one of them has answered",
                retry_after=RETRY_AFTER_S,
            )
        self._held[tenant_id] += 1
        try:
            yield
        finally:
            self._held[tenant_id] -= 1
            if self._held[tenant_id] <= 0:
                del self._held[tenant_id]

    def held(self, tenant_id: uuid.UUID) -> int:
        return self._held[tenant_id]
