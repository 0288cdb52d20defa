"""Schema creation and migrations (Alembic). A new database gets the current schema and is stamped
with the newest revision; an older one is upgraded in place, keeping every row; a database written
by a newer atbench, or one that is not an atbench store, is refused and never written into.

Databases from before Alembic (schema versions 1 and 2, recorded in a `schema_info` table; those
releases shipped no PostgreSQL driver, so they are SQLite files) are upgraded by the first two
revisions.
"""

from __future__ import annotations

from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import inspect, text

from bench.core.errors import BenchError
from bench.store.engine import SCHEMA_LOCK, make_engine
from bench.store.schema import Base

MIGRATIONS = Path(__file__).parent / "migrations"
LEGACY_VERSIONS = {"1": "0001", "2": "0001"}  # schema_info version -> the revision that upgrades it


def alembic_config() -> Config:
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    return config


def head_revision() -> str:
    return ScriptDirectory.from_config(alembic_config()).get_current_head()


def prepare_schema(url: str, name: str, readonly: bool = False) -> None:
    """Create or upgrade the schema of the database at `url` (`name` is what the user called it);
    `readonly`: only check that it is an atbench database at the newest revision.
    Migrations run on a connection of their own, without SQLite's foreign-key enforcement (tables
    are rebuilt; rows keep their ids)."""
    engine = make_engine(url, readonly=readonly, migrating=True)
    try:
        with engine.begin() as con:
            if con.dialect.name == "postgresql" and not readonly:
                con.execute(text("SELECT pg_advisory_xact_lock(:id)"), {"id": SCHEMA_LOCK})
            tables = set(inspect(con).get_table_names())
            if readonly:
                _check_current(con, tables, name)
                return
            if not tables:
                Base.metadata.create_all(con)
                _stamp(con, "head")
                return
            if "alembic_version" in tables:
                current = MigrationContext.configure(con).get_current_revision()
                script = ScriptDirectory.from_config(alembic_config())
                if current is not None and not _known(script, current):
                    raise BenchError(f"database {name!r} has schema revision {current}, which this atbench does not "
                                     f"know (its newest is {script.get_current_head()}): upgrade atbench to read it")
                if current != script.get_current_head():
                    _upgrade(con)
                return
            if "schema_info" in tables:
                version = con.execute(text("select value from schema_info where key = 'schema_version'")).scalar()
                if str(version) not in LEGACY_VERSIONS:
                    raise BenchError(f"database {name!r} has schema version {version}, which this atbench does not "
                                     f"know: upgrade atbench to read it")
                _upgrade(con)
                return
            raise BenchError(f"database {name!r} is not an atbench results store (it has tables "
                             f"{', '.join(sorted(tables)[:5])}{', ...' if len(tables) > 5 else ''} and no schema "
                             f"record); give a new file or an atbench database")
    finally:
        engine.dispose()


def _check_current(con, tables: set[str], name: str) -> None:
    """BenchError unless the (read-only) database is an atbench store at the newest revision."""
    if "alembic_version" not in tables:
        raise BenchError(f"database {name!r} is not an atbench results store at this version (read-only: it "
                         "cannot be upgraded here; open it writable once with this atbench)")
    current = MigrationContext.configure(con).get_current_revision()
    if current != head_revision():
        raise BenchError(f"database {name!r} has schema revision {current}, this atbench reads {head_revision()} "
                         "(read-only: it cannot be upgraded here; open it writable once with this atbench)")


def _known(script: ScriptDirectory, revision: str) -> bool:
    try:
        return script.get_revision(revision) is not None
    except Exception:  # alembic raises its own errors for unknown revisions
        return False


def _stamp(con, revision: str) -> None:
    config = alembic_config()
    config.attributes["connection"] = con
    command.stamp(config, revision)


def _upgrade(con) -> None:
    config = alembic_config()
    config.attributes["connection"] = con
    command.upgrade(config, "head")
