"""A SQLAlchemy 2 application's own transaction (psycopg dialect) as meowmx's `conn=`:
the events commit, or roll back, with the application's writes."""

from __future__ import annotations

from collections.abc import Iterator

import psycopg
import pytest
import sqlalchemy as sa
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column

import meowmx
from meowmx import Client


class Base(DeclarativeBase):
    pass


class Order(Base):
    __tablename__ = "orders"
    id: Mapped[str] = mapped_column(primary_key=True)
    total: Mapped[int]


@pytest.fixture
def engine(dsn: str) -> Iterator[sa.Engine]:
    engine = sa.create_engine("postgresql+psycopg://", creator=lambda: psycopg.connect(dsn))
    Base.metadata.create_all(engine)
    yield engine
    Base.metadata.drop_all(engine)
    engine.dispose()


def stored(client: Client) -> list[tuple[str, str]]:
    return [(e.stream_id, e.event_type) for e in client.read_events()]


def test_events_commit_and_roll_back_with_an_orm_session(engine: sa.Engine, dsn: str) -> None:
    with Client(dsn) as client:
        with Session(engine) as session, session.begin():
            session.add(Order(id="1", total=10))
            session.flush()
            client.append("order", "1", "Placed", {"total": 10}, conn=session)
        with Session(engine) as session:
            with pytest.raises(RuntimeError), session.begin():
                session.add(Order(id="2", total=5))
                client.append("order", "2", "Placed", {"total": 5}, conn=session)
                raise RuntimeError("the request failed")
            assert session.scalars(sa.select(Order.id)).all() == ["1"]
        assert stored(client) == [("1", "Placed")]


def test_a_core_connection_shares_its_transaction(engine: sa.Engine, dsn: str) -> None:
    with Client(dsn) as client:
        with engine.begin() as conn:
            conn.execute(sa.insert(Order).values(id="3", total=7))
            client.append("order", "3", "Placed", {}, conn=conn)
            # Reads on the same connection see the transaction's own writes.
            assert client.stream_version("order", "3", conn=conn) == 1
        with engine.connect() as conn:
            client.append("order", "4", "Placed", {}, conn=conn)
            conn.rollback()
        assert stored(client) == [("3", "Placed")]


def test_conn_of_another_kind_is_a_type_error(dsn: str) -> None:
    with Client(dsn) as client, pytest.raises(TypeError, match="postgresql\\+psycopg"):
        client.append("order", "5", "Placed", {}, conn=object())  # type: ignore[arg-type]


def test_conflicts_are_the_typed_errors_through_sqlalchemy(engine: sa.Engine, dsn: str) -> None:
    with Client(dsn) as client:
        client.append("order", "6", "Placed", {})
        with Session(engine) as session, session.begin():
            with pytest.raises(meowmx.WrongExpectedVersion):
                client.append("order", "6", "Placed", {}, expected_version=0, conn=session)
            session.rollback()
        assert client.stream_version("order", "6") == 1
