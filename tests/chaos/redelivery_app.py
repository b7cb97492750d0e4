"""workers.app with redelivery in seconds: chaos tests run it so a crashed worker's messages come back fast."""

# The fleet's Redis transport redelivers a message that was delivered and never acknowledged (its
# worker was SIGKILLed, or lost the broker before it could ack) once ``visibility_timeout`` has
# passed, at the next restore sweep: 600 s and a sweep every ~100 s in production
# (umcd.celeryconf). Only these two timings change here; queues, acks, serializers, the runtime and
# the tasks are the production ones.

from __future__ import annotations

import os

from workers.app import app

VISIBILITY_TIMEOUT_S = float(os.environ.get("UMCD_TEST_VISIBILITY_TIMEOUT_S", "5"))

app.conf.broker_transport_options = {
    **(app.conf.broker_transport_options or {}),
    "visibility_timeout": VISIBILITY_TIMEOUT_S,
    "unacked_restore_interval": 1,
    "unacked_restore_throttle": 1,
}

__all__ = ["app"]
