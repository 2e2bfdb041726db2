"""Creating engines and applying migrations."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from alembic.config import Config
from sqlalchemy import Engine, create_engine, event

from alembic import command

__all__ = ["alembic_config", "driver_url", "make_engine", "upgrade"]


def driver_url(url: str) -> str:
    """`url` with the driver the gateway ships (psycopg2) made explicit for PostgreSQL."""
    for bare in ("postgresql://", "postgres://"):
        if url.startswith(bare):
            return "postgresql+psycopg2://" + url[len(bare) :]
    return url


def make_engine(url: str, **kwargs: Any) -> Engine:
    """An engine tuned for the gateway: WAL and a busy timeout on SQLite, pre-ping elsewhere."""
    url = driver_url(url)
    if url.startswith("sqlite"):
        engine = create_engine(url, connect_args={"timeout": 30}, **kwargs)

        @event.listens_for(engine, "connect")
        def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
            cursor = dbapi_connection.cursor()
            cursor.execute("PRAGMA journal_mode=WAL")
            cursor.execute("PRAGMA synchronous=NORMAL")
            cursor.execute("PRAGMA foreign_keys=ON")
            cursor.close()

        return engine
    return create_engine(url, pool_pre_ping=True, **kwargs)


def alembic_config(url: str) -> Config:
    """Alembic's config for the migrations shipped with the package."""
    import estate_migrations  # the repository's alembic/ folder, installed under this name

    location = next(Path(p) for p in estate_migrations.__path__ if (Path(p) / "env.py").is_file())
    config = Config()
    config.set_main_option("script_location", str(location))
    config.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    return config


def upgrade(url: str, revision: str = "head") -> None:
    """Bring the database at `url` to `revision`."""
    command.upgrade(alembic_config(url), revision)
