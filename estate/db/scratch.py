"""A throwaway PostgreSQL database: created, migrated, dropped (tests and benchmarks)."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from contextlib import contextmanager

from sqlalchemy import create_engine, text

from estate.db.engine import driver_url, upgrade

__all__ = ["scratch_database"]


@contextmanager
def scratch_database(admin_url: str, prefix: str = "estate_scratch") -> Iterator[str]:
    """Create a fresh database on the server of `admin_url`, migrate it, yield its URL,
    and drop it afterwards (closing whatever connections are left)."""
    name = f"{prefix}_{uuid.uuid4().hex[:12]}"
    admin = create_engine(driver_url(admin_url), isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as conn:
            conn.execute(text(f'CREATE DATABASE "{name}"'))
        url = admin_url.rsplit("/", 1)[0] + f"/{name}"
        try:
            upgrade(url)
            yield url
        finally:
            with admin.connect() as conn:
                conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    finally:
        admin.dispose()
