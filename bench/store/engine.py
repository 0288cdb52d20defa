"""Database connections made safe for many writers.

SQLite: WAL journal, a 60 s busy timeout, foreign keys on; the engine for writing begins every
transaction IMMEDIATE (it takes the write lock first, so two processes never deadlock upgrading a
read lock to a write lock: the second waits its turn instead of failing with "database is
locked"), the one for reading begins them deferred (readers never wait for writers in WAL).
PostgreSQL (psycopg 3): plain transactions; schema changes serialize on an advisory lock.
"""

from __future__ import annotations

import sqlite3
import time

from sqlalchemy import create_engine, event
from sqlalchemy.engine import Engine

BUSY_TIMEOUT_S = 60
SCHEMA_LOCK = 716_263_001  # PostgreSQL advisory lock id taken while the schema is created or migrated


def make_engine(url: str, *, readonly: bool = False, migrating: bool = False, writing: bool = True) -> Engine:
    """An engine for `url`; SQLite connections configured as the module docstring says. While
    `migrating` (or checking whether the file is a store at all) foreign keys are off, tables being
    rebuilt, and the journal mode is left alone, so a file that is not ours is not touched."""
    if not url.startswith("sqlite"):
        return create_engine(url, pool_pre_ping=True)
    engine = create_engine(url, connect_args={"timeout": BUSY_TIMEOUT_S})

    @event.listens_for(engine, "connect")
    def connect(dbapi_connection, _record):
        dbapi_connection.isolation_level = None  # the "begin" event below issues BEGIN itself
        if readonly:
            dbapi_connection.execute("PRAGMA query_only=ON")
            return
        if not migrating:
            dbapi_connection.execute("PRAGMA foreign_keys=ON")

    @event.listens_for(engine, "begin")
    def begin(connection):
        connection.exec_driver_sql("BEGIN IMMEDIATE" if writing and not readonly else "BEGIN")

    return engine


def enable_wal(path: str) -> None:
    """Switch a SQLite store to the WAL journal (persistent; readers then never wait for writers).
    The switch needs the file to itself for an instant: retried while other connections hold it."""
    deadline = time.monotonic() + BUSY_TIMEOUT_S
    while True:
        con = sqlite3.connect(path, timeout=BUSY_TIMEOUT_S)
        try:
            if con.execute("PRAGMA journal_mode=WAL").fetchone()[0].lower() == "wal":
                return
        except sqlite3.OperationalError:
            if time.monotonic() > deadline:
                raise
        finally:
            con.close()
        time.sleep(0.05)
