"""Alembic environment: runs against the engine handed over by ``Store.migrate``."""

from alembic import context
from sqlalchemy import create_engine

from bulwark.store.db import Base

config = context.config
target_metadata = Base.metadata


def run() -> None:
    engine = config.attributes.get("engine") or create_engine(
        config.get_main_option("sqlalchemy.url"))
    with engine.begin() as connection:
        context.configure(connection=connection, target_metadata=target_metadata,
                          render_as_batch=connection.dialect.name == "sqlite")
        context.run_migrations()


run()
