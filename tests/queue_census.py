"""Run one `inferq` command as a deployment runs it and report the queues it consumes.

    python -m tests.queue_census worker --model tiny --metrics-port 9100

The command runs for real (its settings from the environment, its broker connection, its engine
and its Celery worker); only watching is added: every ``kombu.Consumer`` that starts consuming
records its queues, whoever made it (Celery's task consumer or a consumer step of ours). Once a
Celery worker is ready the process prints ``CONSUMES <json list>`` and exits. A command that
serves something else instead (the API's HTTP server, the beat scheduler) or returns (migrate)
consumes nothing: it prints an empty list when it gets there.
"""

from __future__ import annotations

import json
import os
import sys
from typing import Any

MARK = "CONSUMES "


def _report(queues: set[str]) -> None:
    sys.stdout.write(f"{MARK}{json.dumps(sorted(queues))}\n")
    sys.stdout.flush()
    os._exit(0)  # no shutdown: nothing was taken from the queues, nothing needs handing back


def main(args: list[str]) -> None:
    import celery.apps.beat
    import uvicorn
    from celery.signals import worker_ready
    from kombu.messaging import Consumer

    from inferq.cli import main as inferq

    consumed: set[str] = set()
    consume = Consumer.consume

    def watched(self: Consumer, *a: Any, **kw: Any) -> Any:
        consumed.update(queue.name for queue in self.queues or ())
        return consume(self, *a, **kw)  # type: ignore[no-untyped-call]

    Consumer.consume = watched  # type: ignore[method-assign]
    worker_ready.connect(lambda **_: _report(consumed), weak=False)
    uvicorn.run = lambda *a, **kw: _report(consumed)
    celery.apps.beat.Beat.run = lambda self: _report(consumed)
    inferq.main(args, prog_name="inferq", standalone_mode=False)
    _report(consumed)


if __name__ == "__main__":
    main(sys.argv[1:])
