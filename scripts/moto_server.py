"""Starts moto's server (the AWS emulator the AWS bridge's tests run against) with its SQS
queues made safe for concurrent requests. Run it with the Python of moto's virtualenv; it takes
moto_server's arguments (`-H 127.0.0.1 -p PORT`).

moto's server answers requests on threads, but its SQS queues are not guarded: DeleteMessage
rebuilds a queue's message list without a lock, so two deletes at once can undo each other (a
deleted message comes back after its visibility timeout), and a send beside a delete can lose
the message sent; two receives at once can both hand out one message. Real SQS does none of
this. The conformance cases consume one queue from several instances at once and saw exactly
that: a message acknowledged at one instance was delivered again, as attempt 2, at another,
with no error anywhere. Here every call that reads or changes a queue's messages holds that
queue's own lock (the one moto already takes for a send); a long poll still waits without it.
"""

import functools
import sys

from moto.server import main
from moto.sqs.models import SQSBackend

# SQSBackend methods that take the queue's name first and read or change its messages.
GUARDED = (
    "send_message",
    "send_message_batch",
    "receive_message",
    "delete_message",
    "delete_message_batch",
    "change_message_visibility",
    "change_message_visibility_batch",
    "purge_queue",
)


def guarded(method):
    """`method` run holding the queue's message lock (a re-entrant lock inside a Condition:
    moto's own locking inside it nests, and its long-poll wait releases it while waiting)."""

    @functools.wraps(method)
    def call(self, queue_name, *args, **kwargs):
        lock = self.get_queue(queue_name)._messages_lock
        with lock:
            return method(self, queue_name, *args, **kwargs)

    return call


for name in GUARDED:
    setattr(SQSBackend, name, guarded(getattr(SQSBackend, name)))

if __name__ == "__main__":
    sys.exit(main())
