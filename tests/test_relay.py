"""`cqrs-pg relay` against a real nats-server with JetStream (one of the test's own, so
that it can be restarted): every event in the stream once, with its position as message
id, each aggregate's events in version order, through relays killed with SIGKILL, a
broker restart and relays running side by side."""

from __future__ import annotations

import random
import signal
import threading
import time
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
from psycopg.conninfo import make_conninfo

from cqrs_pg_tools.natsserver import NatsServer, StoredMessage, stream_count, stream_messages
from cqrs_pg_tools.testing import DaemonProcess, Database, run, seed_shop, wait_until
from cqrs_pg_tools.workload import ShopWorkload

pytestmark = pytest.mark.slow


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[NatsServer]:
    server = NatsServer(tmp_path / "nats")
    server.start()
    yield server
    server.stop()


def relay_process(dsn: str, log: Path, broker: NatsServer, *extra: str) -> DaemonProcess:
    relay = DaemonProcess(dsn, log, "--to", broker.url, *extra, command="relay")
    relay.start()
    return relay


def outbox(db: Database) -> list[tuple[int, str, str, str, int]]:
    with db.connect() as conn:
        return [
            (int(r[0]), r[1], r[2], str(r[3]), int(r[4]))
            for r in conn.execute(
                "SELECT position, event_type, aggregate_type, aggregate_id, aggregate_version FROM cqrs.outbox ORDER BY position"
            )
        ]


def assert_exactly_once_in_order(messages: list[StoredMessage], events: list[tuple[int, str, str, str, int]]) -> None:
    ids = [m.msg_id for m in messages]
    assert len(ids) == len(set(ids)), "a message id is in the stream twice"
    assert sorted(int(i) for i in ids if i is not None) == [e[0] for e in events], "stream and outbox differ"
    by_position = {e[0]: e for e in events}
    last: dict[str, tuple[int, int]] = {}
    for m in messages:
        position, event_type, aggregate_type, aggregate_id, version = by_position[int(m.msg_id or 0)]
        assert m.body["position"] == position
        assert m.body["aggregate_version"] == version
        assert m.subject == f"cqrs.{aggregate_type}.{event_type}"
        before = last.get(aggregate_id)
        # an order's lines share its version: position order within a version
        assert before is None or before < (version, position), f"aggregate {aggregate_id} out of order at {position}"
        last[aggregate_id] = (version, position)


def test_relay_publishes_each_event_with_its_position_as_message_id(db: Database, broker: NatsServer, tmp_path: Path,
                                                                    login_as) -> None:  # type: ignore[no-untyped-def]
    with db.connect() as conn:
        seed_shop(conn)
    consumer = make_conninfo(db.dsn, user=login_as("cqrs_consumer"))
    relay = relay_process(consumer, tmp_path / "relay.log", broker)
    try:
        events = outbox(db)
        wait_until(lambda: stream_count(broker.url, "CQRS") == len(events), "the relay to publish the history",
                   timeout=30)
        with db.connect() as conn:
            customer = run(conn, "register_customer", "relayed@example.com", "Relayed").aggregate_id
        events = outbox(db)
        wait_until(lambda: stream_count(broker.url, "CQRS") == len(events), "the relay to publish a new event")
        messages = stream_messages(broker.url, "CQRS")
        assert_exactly_once_in_order(messages, events)
        newest = messages[-1]
        assert newest.body["aggregate_id"] == str(customer)
        assert set(newest.body) == {"position", "event_type", "aggregate_type", "aggregate_id", "aggregate_version",
                                    "payload", "metadata", "occurred_at"}
        assert newest.body["payload"]["email"] == "relayed@example.com"
        assert "command_id" in newest.body["metadata"]
        assert relay.signal(signal.SIGTERM, 15) == 0
    finally:
        relay.stop()


def test_relays_killed_and_a_broker_restart_leave_each_event_once_in_order(db: Database, broker: NatsServer,
                                                                           tmp_path: Path) -> None:
    workload = ShopWorkload(db.dsn, seed=7, hold_max=0.003)
    workload.setup(customers=8, products=4)
    writers = threading.Thread(target=workload.run, args=(6,), kwargs={"seconds": 14.0}, daemon=True)
    rng = random.Random(11)
    # two relays side by side: they take turns, never publishing an event twice
    relays = [relay_process(db.dsn, tmp_path / f"relay-{n}.log", broker, "--batch-size", str(50 + 100 * n))
              for n in range(2)]
    try:
        writers.start()
        for round_ in range(6):
            time.sleep(rng.uniform(0.8, 1.6))
            victim = relays[round_ % 2]
            victim.kill()
            if round_ == 2:
                broker.stop()
                time.sleep(1.0)
                broker.start()
            time.sleep(rng.uniform(0.0, 0.4))
            victim.start()
        writers.join()
        assert workload._result.total > 500 and not workload._result.errors
        events = outbox(db)
        wait_until(lambda: stream_count(broker.url, "CQRS") >= len(events), "the relays to publish every event",
                   timeout=60)
        time.sleep(0.5)  # a duplicate, were there one, would show now
        assert_exactly_once_in_order(stream_messages(broker.url, "CQRS"), events)
        assert any("broker at" in r.output for r in relays), "the broker's absence went unreported"
    finally:
        for r in relays:
            r.kill()


def test_relay_waits_for_an_absent_broker_saying_so_once(db: Database, tmp_path: Path) -> None:
    broker = NatsServer(tmp_path / "nats")  # not started yet
    with db.connect() as conn:
        seed_shop(conn)
    relay = relay_process(db.dsn, tmp_path / "relay.log", broker)
    try:
        wait_until(lambda: "broker at" in relay.output, "the relay to report the broker away")
        time.sleep(1.5)
        assert relay.output.count("broker at") == 1, relay.output
        assert "Traceback" not in relay.output
        broker.start()
        events = outbox(db)
        wait_until(lambda: stream_count(broker.url, "CQRS") == len(events), "the relay to publish once the broker is up",
                   timeout=60)
        assert "is back" in relay.output
        assert relay.signal(signal.SIGTERM, 15) == 0
    finally:
        relay.stop()
        broker.stop()


def test_relay_refuses_a_stream_that_does_not_take_its_subjects(db: Database, broker: NatsServer, tmp_path: Path) -> None:
    import asyncio

    import nats

    async def other_stream() -> None:
        nc = await nats.connect(broker.url)
        await nc.jetstream().add_stream(name="CQRS", subjects=["other.>"])
        await nc.close()

    asyncio.run(other_stream())
    relay = relay_process(db.dsn, tmp_path / "relay.log", broker)
    try:
        assert relay.proc is not None
        assert relay.proc.wait(timeout=30) == 1
        lines = [line for line in relay.output.splitlines() if "Error" in line or "error" in line.lower()]
        assert any("stream CQRS takes subjects other.>, not cqrs.>" in line for line in lines), relay.output
        assert "Traceback" not in relay.output
    finally:
        relay.stop()


def test_relay_with_a_role_that_may_not_consume_says_so_in_one_line(db: Database, broker: NatsServer, tmp_path: Path,
                                                                      login_as) -> None:  # type: ignore[no-untyped-def]
    reader = make_conninfo(db.dsn, user=login_as("cqrs_reader"))
    relay = relay_process(reader, tmp_path / "relay.log", broker)
    try:
        assert relay.proc is not None
        assert relay.proc.wait(timeout=30) == 1
        assert "cqrs_consumer" in relay.output and "Traceback" not in relay.output, relay.output
    finally:
        relay.stop()


def test_relay_subjects_keep_per_aggregate_order_for_a_busy_aggregate(db: Database, broker: NatsServer,
                                                                       tmp_path: Path) -> None:
    # many versions of one product, then the relay drains them in small batches
    with db.connect() as conn:
        _, sku = seed_shop(conn)
        for _ in range(120):
            run(conn, "restock", sku, 1)
    relay = relay_process(db.dsn, tmp_path / "relay.log", broker, "--batch-size", "7")
    try:
        events = outbox(db)
        wait_until(lambda: stream_count(broker.url, "CQRS") == len(events), "the relay to drain the history")
        messages = stream_messages(broker.url, "CQRS")
        assert_exactly_once_in_order(messages, events)
        versions: dict[str, list[int]] = defaultdict(list)
        for m in messages:
            versions[m.body["aggregate_id"]].append(m.body["aggregate_version"])
        assert max(len(v) for v in versions.values()) > 120
    finally:
        relay.stop()


def test_relay_status_shows_its_subscription_lag(db: Database, broker: NatsServer, tmp_path: Path) -> None:
    with db.connect() as conn:
        seed_shop(conn)
    relay = relay_process(db.dsn, tmp_path / "relay.log", broker)
    try:
        events = outbox(db)
        wait_until(lambda: stream_count(broker.url, "CQRS") == len(events), "the relay to publish")
        with psycopg.connect(db.dsn, autocommit=True) as conn:
            wait_until(lambda: conn.execute(
                "SELECT events_behind FROM cqrs.subscription_status() WHERE name = 'relay:CQRS'").fetchone() == (0,),
                "the relay's acknowledgement")
    finally:
        relay.stop()


def test_relay_serves_its_metrics(db: Database, broker: NatsServer, tmp_path: Path) -> None:
    import urllib.request

    from cqrs_pg.metrics import RELAY_NAMES
    from cqrs_pg_tools.natsserver import free_port

    with db.connect() as conn:
        seed_shop(conn)
    port = free_port()
    relay = relay_process(db.dsn, tmp_path / "relay.log", broker, "--metrics-port", str(port))
    try:
        events = outbox(db)
        wait_until(lambda: stream_count(broker.url, "CQRS") == len(events), "the relay to publish")

        def published() -> str:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
                return str(response.read().decode())

        wait_until(lambda: f"cqrs_pg_relay_events_published_total {float(len(events))}" in published(),
                   "the published count")
        text = published()
        assert all(name in text for name in RELAY_NAMES), text
        assert "cqrs_pg_relay_broker_up 1.0" in text
    finally:
        relay.stop()
