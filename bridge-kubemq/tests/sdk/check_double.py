"""Drives a KubeMQ server with KubeMQ's official Python SDK (PyPI `kubemq`) and checks what
KubeMQ's documentation says of every pattern the purista bridge uses.

    python check_double.py HOST:PORT AUTH_TOKEN

Prints one `PASS <check>` line per check and exits 0, or prints `FAIL <check>: <why>` and
exits 1. Written against KubeMQ's documented behaviour, not against the double's code: run it
against a real KubeMQ (with its token) and it must pass the same way.
"""

import asyncio
import sys
import time
import uuid

from kubemq import (
    AsyncCancellationToken,
    AsyncCQClient,
    AsyncPubSubClient,
    AsyncQueuesClient,
    EventMessage,
    EventStoreMessage,
    EventsStoreSubscription,
    EventsSubscription,
    KubeMQError,
    QueriesSubscription,
    QueryMessage,
    QueryResponse,
    QueueMessage,
)
from kubemq.pubsub.events_store_subscription import EventStoreStartPosition

ADDRESS, TOKEN = sys.argv[1], sys.argv[2]
RUN = uuid.uuid4().hex[:8]
WAIT = 10.0


def channel(name):
    return f"sdk-{RUN}.{name}"


def noop(*_args):
    return None


class Collector:
    """Events a background subscription received."""

    def __init__(self):
        self.items = []

    async def wait_for(self, predicate, what, timeout=WAIT):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if predicate(self.items):
                return self.items
            await asyncio.sleep(0.02)
        raise AssertionError(f"{what}: got {[describe(i) for i in self.items]}")


def describe(item):
    body = getattr(item, "body", b"")
    return body.decode(errors="replace") if isinstance(body, bytes) else repr(item)


async def consume(iterator, sink):
    try:
        async for item in iterator:
            sink.items.append(item)
    except asyncio.CancelledError:
        pass


def start(iterator, sink):
    return asyncio.create_task(consume(iterator, sink))


async def until_subscribed(pubsub, chan, sinks):
    """KubeMQ confirms no subscription: send markers until every sink saw one."""
    deadline = time.monotonic() + WAIT
    while time.monotonic() < deadline:
        await pubsub.send_event(EventMessage(channel=chan, body=b"ready"))
        await asyncio.sleep(0.05)
        if all(any(describe(i) == "ready" for i in s.items) for s in sinks):
            for s in sinks:
                s.items.clear()
            return
    raise AssertionError(f"subscriptions on {chan} never received anything")


def bodies(items):
    return [describe(i) for i in items if describe(i) != "ready"]


async def check_auth():
    """A wrong auth token is refused (KubeMQ: UNAUTHENTICATED; pings need no token)."""
    client = AsyncPubSubClient(address=ADDRESS, auth_token="not-the-token", client_id="sdk-bad")
    try:
        async with client:
            result = await client.send_event_store(EventStoreMessage(channel=channel("auth"), body=b"x"))
    except KubeMQError:
        return
    if not result.sent:
        return
    raise AssertionError(f"an event sent with a wrong token was accepted: {result}")


async def check_events_fan_out(pubsub):
    """Events reach every subscriber without a group (fan-out)."""
    chan = channel("fan")
    sinks = [Collector(), Collector()]
    tasks = [
        start(pubsub.subscribe_to_events(EventsSubscription(channel=chan, on_receive_event_callback=noop)), s)
        for s in sinks
    ]
    await until_subscribed(pubsub, chan, sinks)
    for n in range(5):
        await pubsub.send_event(EventMessage(channel=chan, body=f"e{n}".encode()))
    for s in sinks:
        await s.wait_for(lambda items: len(bodies(items)) >= 5, "every subscriber gets every event")
        assert bodies(s.items) == [f"e{n}" for n in range(5)], bodies(s.items)
    for t in tasks:
        t.cancel()


async def check_events_group(pubsub):
    """Subscribers sharing a group get each event once between them."""
    chan = channel("group")
    sinks = [Collector(), Collector()]
    tasks = [
        start(
            pubsub.subscribe_to_events(
                EventsSubscription(channel=chan, group="g1", on_receive_event_callback=noop)
            ),
            s,
        )
        for s in sinks
    ]
    # Markers go to one member at a time: keep sending until both have seen one.
    await until_subscribed(pubsub, chan, sinks)
    for n in range(20):
        await pubsub.send_event(EventMessage(channel=chan, body=f"g{n}".encode()))
    both = Collector()
    deadline = time.monotonic() + WAIT
    while time.monotonic() < deadline and len(bodies(sinks[0].items) + bodies(sinks[1].items)) < 20:
        await asyncio.sleep(0.02)
    got = bodies(sinks[0].items) + bodies(sinks[1].items)
    assert sorted(got) == sorted(f"g{n}" for n in range(20)), got
    assert bodies(sinks[0].items) and bodies(sinks[1].items), "one member got everything"
    del both
    for t in tasks:
        t.cancel()


async def check_wildcards(pubsub):
    """`*` matches one token, `>` one or more (Events subscriptions only)."""
    base = channel("wild")
    star, rest = Collector(), Collector()
    tasks = [
        start(pubsub.subscribe_to_events(EventsSubscription(channel=f"{base}.*.c", on_receive_event_callback=noop)), star),
        start(pubsub.subscribe_to_events(EventsSubscription(channel=f"{base}.>", on_receive_event_callback=noop)), rest),
    ]
    deadline = time.monotonic() + WAIT
    while time.monotonic() < deadline:
        await pubsub.send_event(EventMessage(channel=f"{base}.r.c", body=b"ready"))
        await asyncio.sleep(0.05)
        if star.items and rest.items:
            break
    star.items.clear()
    rest.items.clear()
    for chan, body in [(f"{base}.b.c", b"one-token"), (f"{base}.b.d.c", b"two-tokens"), (f"{base}.x", b"short")]:
        await pubsub.send_event(EventMessage(channel=chan, body=body))
    await rest.wait_for(lambda items: len(bodies(items)) >= 3, "`>` gets every deeper channel")
    await pubsub.send_event(EventMessage(channel=f"{base}.z.c", body=b"end"))
    await star.wait_for(lambda items: "end" in bodies(items), "`*` gets a channel with one token there")
    assert bodies(star.items) == ["one-token", "end"], bodies(star.items)
    assert sorted(bodies(rest.items)) == sorted(["one-token", "two-tokens", "short", "end"]), bodies(rest.items)
    for t in tasks:
        t.cancel()


async def check_events_store(pubsub):
    """Stored events carry sequences 1, 2, 3 …; each start position replays from its place."""
    chan = channel("store")
    for n in range(1, 4):
        result = await pubsub.send_event_store(EventStoreMessage(channel=chan, body=f"s{n}".encode()))
        assert result.sent, result

    async def replay(kind, value=0, expect=0, live=None):
        sink = Collector()
        sub = EventsStoreSubscription(
            channel=chan,
            on_receive_event_callback=noop,
            events_store_type=kind,
            events_store_sequence_value=value,
        )
        task = start(pubsub.subscribe_to_events_store(sub), sink)
        if live is not None:
            # New-only sees nothing stored; send until the live one arrives.
            deadline = time.monotonic() + WAIT
            while time.monotonic() < deadline and not sink.items:
                await pubsub.send_event_store(EventStoreMessage(channel=chan, body=live))
                await asyncio.sleep(0.1)
        await sink.wait_for(lambda items: len(items) >= expect, f"{kind.name} replays {expect}")
        await asyncio.sleep(0.1)
        task.cancel()
        return [(i.sequence, describe(i)) for i in sink.items]

    first = await replay(EventStoreStartPosition.StartFromFirst, expect=3)
    assert first == [(1, "s1"), (2, "s2"), (3, "s3")], first
    at_two = await replay(EventStoreStartPosition.StartAtSequence, value=2, expect=2)
    assert at_two == [(2, "s2"), (3, "s3")], at_two
    last = await replay(EventStoreStartPosition.StartFromLast, expect=1)
    assert last == [(3, "s3")], last
    new_only = await replay(EventStoreStartPosition.StartFromNew, expect=1, live=b"live")
    assert new_only and all(body == "live" for _, body in new_only), new_only
    assert new_only[0][0] >= 4, new_only


async def check_events_store_group(pubsub):
    """Events Store subscribers sharing a group get each stored event once between them, in
    sequence order per member; the events stay stored for a later StartFromFirst reader."""
    chan = channel("store-group")
    sinks = [Collector(), Collector()]
    tasks = [
        start(
            pubsub.subscribe_to_events_store(
                EventsStoreSubscription(
                    channel=chan,
                    group="sg",
                    on_receive_event_callback=noop,
                    events_store_type=EventStoreStartPosition.StartFromNew,
                )
            ),
            s,
        )
        for s in sinks
    ]
    # Markers go to one member at a time: keep storing them until both have seen one.
    deadline = time.monotonic() + WAIT
    markers = 0
    while time.monotonic() < deadline:
        await pubsub.send_event_store(EventStoreMessage(channel=chan, body=b"ready"))
        markers += 1
        await asyncio.sleep(0.05)
        if all(any(describe(i) == "ready" for i in s.items) for s in sinks):
            break
    else:
        raise AssertionError(f"events store group on {chan} never received anything")
    for n in range(20):
        result = await pubsub.send_event_store(EventStoreMessage(channel=chan, body=f"q{n}".encode()))
        assert result.sent, result
    deadline = time.monotonic() + WAIT
    while time.monotonic() < deadline and len(bodies(sinks[0].items) + bodies(sinks[1].items)) < 20:
        await asyncio.sleep(0.02)
    got = bodies(sinks[0].items) + bodies(sinks[1].items)
    assert sorted(got) == sorted(f"q{n}" for n in range(20)), got
    assert bodies(sinks[0].items) and bodies(sinks[1].items), "one member got everything"
    for s in sinks:
        sequences = [i.sequence for i in s.items]
        assert sequences == sorted(sequences), f"a member got stored events out of order: {sequences}"
    for t in tasks:
        t.cancel()
    reader = Collector()
    task = start(
        pubsub.subscribe_to_events_store(
            EventsStoreSubscription(
                channel=chan,
                on_receive_event_callback=noop,
                events_store_type=EventStoreStartPosition.StartFromFirst,
            )
        ),
        reader,
    )
    await reader.wait_for(lambda items: len(items) >= markers + 20, "StartFromFirst replays what the group took")
    task.cancel()
    assert bodies(reader.items) == [f"q{n}" for n in range(20)], bodies(reader.items)


async def check_queries(cq):
    """A query is answered by one responder of a group; nobody subscribed = error at timeout."""
    chan = channel("query")
    answered = {"a": 0, "b": 0}

    async def responder(name):
        sub = QueriesSubscription(channel=chan, group="responders", on_receive_query_callback=noop)
        async for query in cq.subscribe_to_queries(sub):
            answered[name] += 1
            await cq.send_response(
                QueryResponse(query_received=query, is_executed=True, body=b"echo:" + query.body)
            )

    tasks = [asyncio.create_task(responder("a")), asyncio.create_task(responder("b"))]
    deadline = time.monotonic() + WAIT
    while True:
        try:
            reply = await cq.send_query(QueryMessage(channel=chan, body=b"ping", timeout_in_seconds=1))
            if reply.is_executed:
                break
        except KubeMQError:
            pass
        if time.monotonic() > deadline:
            raise AssertionError("no responder ever answered")
    for n in range(10):
        reply = await cq.send_query(QueryMessage(channel=chan, body=f"q{n}".encode(), timeout_in_seconds=5))
        assert reply.is_executed and reply.body == f"echo:q{n}".encode(), reply
    total = answered["a"] + answered["b"]
    assert total == 11 or total >= 11, answered
    for t in tasks:
        t.cancel()

    began = time.monotonic()
    try:
        reply = await cq.send_query(QueryMessage(channel=channel("nobody"), body=b"x", timeout_in_seconds=1))
        assert not reply.is_executed, f"a query nobody subscribes to was executed: {reply}"
    except KubeMQError as e:
        assert "timeout" in str(e).lower(), e
    took = time.monotonic() - began
    assert 0.9 <= took <= 5.0, f"a query nobody serves answered after {took:.2f} s, not at its 1 s timeout"


async def check_queues(queues):
    """Queues: FIFO pull, delays, MaxReceiveCount dead-lettering, peek and ack-all."""
    chan = channel("queue")
    for n in range(3):
        result = await queues.send_queue_message(QueueMessage(channel=chan, body=f"m{n}".encode()))
        assert not result.is_error, result
    got = await queues.receive_queue_messages(chan, max_messages=10, wait_timeout_seconds=2, auto_ack=True)
    assert [m.body for m in got.messages] == [b"m0", b"m1", b"m2"], got.messages

    delayed = channel("delayed")
    await queues.send_queue_message(QueueMessage(channel=delayed, body=b"later", delay_in_seconds=2))
    early = await queues.receive_queue_messages(delayed, max_messages=1, wait_timeout_seconds=1, auto_ack=True)
    assert not early.messages, "a delayed message was received before its delay"
    late = await queues.receive_queue_messages(delayed, max_messages=1, wait_timeout_seconds=4, auto_ack=True)
    assert [m.body for m in late.messages] == [b"later"], late.messages

    poison, dlq = channel("poison"), channel("poison-dlq")
    await queues.send_queue_message(
        QueueMessage(channel=poison, body=b"bad", max_receive_count=1, max_receive_queue=dlq)
    )
    first = await queues.receive_queue_messages(poison, max_messages=1, wait_timeout_seconds=2)
    assert len(first.messages) == 1, first.messages
    await first.reject_all()
    again = await queues.receive_queue_messages(poison, max_messages=1, wait_timeout_seconds=1, auto_ack=True)
    assert not again.messages, "a message received MaxReceiveCount times came back after a reject"
    dead = await queues.receive_queue_messages(dlq, max_messages=1, wait_timeout_seconds=2, auto_ack=True)
    assert [m.body for m in dead.messages] == [b"bad"], dead.messages

    kept = channel("kept")
    for n in range(2):
        await queues.send_queue_message(QueueMessage(channel=kept, body=f"k{n}".encode()))
    peeked = await queues.peek_queue_messages(kept, max_messages=10, wait_timeout_seconds=1)
    assert len(peeked.messages) == 2, peeked.messages
    purged = await queues.ack_all_queue_messages(kept, wait_time_seconds=1)
    assert purged == 2, f"ack-all removed {purged} messages, not 2"

    empty = await queues.receive_queue_messages(kept, max_messages=10, wait_timeout_seconds=1, auto_ack=True)
    assert not empty.messages, empty.messages


async def main():
    failed = False

    async def run(name, check, *args):
        nonlocal failed
        try:
            await asyncio.wait_for(check(*args), timeout=60)
            print(f"PASS {name}", flush=True)
        except Exception as e:  # noqa: BLE001 - report every failure and go on
            failed = True
            print(f"FAIL {name}: {type(e).__name__}: {e}", flush=True)

    await run("auth token", check_auth)
    async with AsyncPubSubClient(address=ADDRESS, auth_token=TOKEN, client_id=f"sdk-{RUN}") as pubsub:
        await run("events fan-out", check_events_fan_out, pubsub)
        await run("events group", check_events_group, pubsub)
        await run("events wildcards", check_wildcards, pubsub)
        await run("events store start positions", check_events_store, pubsub)
        await run("events store group", check_events_store_group, pubsub)
    async with AsyncCQClient(address=ADDRESS, auth_token=TOKEN, client_id=f"sdk-cq-{RUN}") as cq:
        await run("queries", check_queries, cq)
    async with AsyncQueuesClient(address=ADDRESS, auth_token=TOKEN, client_id=f"sdk-q-{RUN}") as queues:
        await run("queues", check_queues, queues)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
