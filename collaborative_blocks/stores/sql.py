"""The SQL schema of the event log, shared by the SQLite and PostgreSQL stores.

SQLAlchemy Core owns the schema and the dialect differences; each store's hot write path may
sit below SQLAlchemy on the raw DB-API connection (see ``sqlite.py`` and ``postgres.py``), but
creates and reads exactly these tables.

Row shape = eventsourcing's stored event: ``stream`` (originator id), ``version`` (originator
version), ``topic``, ``state`` (bytes) and ``position`` (notification id).
"""

from __future__ import annotations

from sqlalchemy import (
    BigInteger,
    Column,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    PrimaryKeyConstraint,
    String,
    Table,
    Text,
    UniqueConstraint,
)

__all__ = ["consumer_positions", "events", "inbox", "metadata", "snapshots"]

metadata = MetaData()

# BigInteger on PostgreSQL, INTEGER PRIMARY KEY (the rowid) on SQLite.
_Position = BigInteger().with_variant(Integer(), "sqlite")

events = Table(
    "cb_events",
    metadata,
    Column("position", _Position, primary_key=True, autoincrement=True),
    Column("stream", String(255), nullable=False),
    Column("version", BigInteger, nullable=False),
    Column("topic", Text, nullable=False),
    Column("state", LargeBinary, nullable=False),
    UniqueConstraint("stream", "version", name="cb_events_stream_version"),
)
Index("cb_events_topic_position", events.c.topic, events.c.position)

snapshots = Table(
    "cb_snapshots",
    metadata,
    Column("stream", String(255), primary_key=True),
    Column("version", BigInteger, nullable=False),
    Column("topic", Text, nullable=False),
    Column("state", LargeBinary, nullable=False),
)

consumer_positions = Table(
    "cb_consumer_positions",
    metadata,
    Column("consumer", String(255), primary_key=True),
    Column("position", BigInteger, nullable=False),
)

inbox = Table(
    "cb_inbox",
    metadata,
    Column("consumer", String(255), nullable=False),
    Column("message_id", String(255), nullable=False),
    Column("position", BigInteger, nullable=True),
    PrimaryKeyConstraint("consumer", "message_id", name="cb_inbox_pk"),
)
