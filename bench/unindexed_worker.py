"""`python -m bench.unindexed_worker worker`: mailer's worker with the delivery log's indexes off.

Only for the `log-cost` phase, which measures what indexing costs on the send path: the same
worker process, whose DeliveryLog appends each entry to the stream alone (no lists, buckets or
counters). Not a setting on purpose: a site that turned the indexes off would find `mailer log
--recipient` empty for whatever was written meanwhile.
"""

from typing import Any

import mailer.worker
from mailer.cli import main
from mailer.state.deliverylog import DeliveryLog


class _UnindexedLog(DeliveryLog):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs["indexed"] = False
        super().__init__(*args, **kwargs)


mailer.worker.DeliveryLog = _UnindexedLog  # type: ignore[misc]
main()
