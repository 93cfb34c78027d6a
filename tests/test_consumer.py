"""The Python consumer of a subscription (cqrs_pg.subscriptions): events in position
order, acknowledged once handled, handed out again after a crash or a lost connection,
and never skipped."""

from __future__ import annotations

import threading

import psycopg
import psycopg.conninfo
import pytest

from cqrs_pg.errors import DatabaseUnavailable, NotFound, Rejected
from cqrs_pg.subscriptions import Event, Subscription, create_subscription
from cqrs_pg_tools.testing import Database, run, scalar, seed_shop, wait_until


def positions(events: list[Event]) -> list[int]:
    return [e.position for e in events]


def outbox_positions(db: Database) -> list[int]:
    with db.connect() as conn:
        return [r[0] for r in conn.execute("SELECT position FROM cqrs.outbox ORDER BY position")]


def test_events_come_in_order_and_what_was_handled_is_not_handed_out_again(db: Database) -> None:
    assert create_subscription(db.dsn, "billing", from_beginning=True)
    assert not create_subscription(db.dsn, "billing", exist_ok=True)
    with pytest.raises(Rejected, match="already exists"):
        create_subscription(db.dsn, "billing")
    with db.connect() as conn:
        seed_shop(conn)
        for n in range(5):
            run(conn, "register_customer", f"c{n}@example.com", f"C{n}")
    everything = outbox_positions(db)

    handled: list[Event] = []
    with Subscription(db.dsn, "billing", max_events=3, idle_exit=True) as sub:
        for event in sub:
            handled.append(event)
            if len(handled) == 4:  # stop inside the second batch
                break
    assert positions(handled) == everything[:4]
    assert handled[0].payload and handled[0].metadata["command_id"] and handled[0].cursor == str(everything[0])

    # closing acknowledged the three the loop moved past; the one in hand when it was left
    # (handled, or failed: the consumer cannot tell) comes again
    with Subscription(db.dsn, "billing", max_events=100, idle_exit=True) as sub:
        rest = list(sub)
    assert positions(rest) == everything[3:]


def test_a_consumer_that_dies_before_acking_gets_its_events_again(db: Database) -> None:
    create_subscription(db.dsn, "audit", from_beginning=True)
    with db.connect() as conn:
        seed_shop(conn)
    everything = outbox_positions(db)
    crashed = Subscription(db.dsn, "audit", idle_exit=True)
    batch = next(crashed.batches())
    assert positions(batch) == everything
    # no ack: the process dies with its connection
    assert crashed._conn is not None
    crashed._conn.close()
    with Subscription(db.dsn, "audit", idle_exit=True) as sub:
        assert positions(list(sub)) == everything


def test_a_lost_connection_is_reconnected_and_nothing_is_skipped(db: Database) -> None:
    create_subscription(db.dsn, "mailer")
    received: list[int] = []
    sub = Subscription(db.dsn, "mailer", max_events=2, poll_interval=0.02, application_name="test mailer")
    consumer = threading.Thread(target=lambda: received.extend(e.position for e in sub), daemon=True)
    consumer.start()
    with db.connect() as conn:
        seed_shop(conn)
        wait_until(lambda: len(set(received)) >= 3, "the consumer to receive the first events")
        conn.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name = 'test mailer'")
        for n in range(4):
            run(conn, "register_customer", f"m{n}@example.com", f"M{n}")
        everything = outbox_positions(db)
        wait_until(lambda: set(received) >= set(everything), "the consumer to receive every event after reconnecting")
        sub.stop()
        consumer.join(timeout=10)
        # handed out again at most after the lost connection: in order, each at least once
        assert sorted(set(received)) == everything
        assert received == sorted(received) or len(received) > len(set(received))
        wait_until(lambda: scalar(conn, "SELECT last_position FROM cqrs.subscriptions WHERE name = 'mailer'")
                   == everything[-1], "the last ack")
    sub.close()


def test_an_unknown_subscription_is_refused_in_one_line(db: Database) -> None:
    with pytest.raises(NotFound, match="subscription 'nope' does not exist"):
        next(iter(Subscription(db.dsn, "nope")))
    with psycopg.connect(db.dsn, autocommit=True) as conn:
        assert scalar(conn, "SELECT count(*) FROM cqrs.subscriptions") == 0


def test_mistakes_are_refused_at_once(db: Database) -> None:
    """A string where a list of types belongs would filter on its letters; a login the
    server refuses was retried forever; a poll interval of nan polled without a pause."""
    with pytest.raises(ValueError, match=r"event_types must be a list of types, not the string 'order\.created'"):
        create_subscription(db.dsn, "s", event_types="order.created")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="aggregate_types"):
        create_subscription(db.dsn, "s", aggregate_types="order")  # type: ignore[arg-type]
    with psycopg.connect(db.dsn, autocommit=True) as conn:
        assert scalar(conn, "SELECT count(*) FROM cqrs.subscriptions") == 0
    with pytest.raises(ValueError, match="poll_interval"):
        Subscription(db.dsn, "s", poll_interval=float("nan"))
    create_subscription(db.dsn, "s")
    wrong_login = psycopg.conninfo.make_conninfo(db.dsn, user="no_such_login")
    with pytest.raises(DatabaseUnavailable, match="no_such_login"):
        next(iter(Subscription(wrong_login, "s", idle_exit=True)))
