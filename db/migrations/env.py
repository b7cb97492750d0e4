"""Alembic environment of the audit store: migrates the connection or URL that `db.migrate` hands over."""

from __future__ import annotations

from logging.config import fileConfig

from alembic import context
from sqlalchemy.pool import NullPool

from db.models import Base
from db.session import create_engine_for

config = context.config
if config.config_file_name is not None:  # the `alembic` command line with db/alembic.ini
    fileConfig(config.config_file_name, disable_existing_loggers=False)
target_metadata = Base.metadata


def _database_url() -> str:
    url = config.attributes.get("url") or config.get_main_option("sqlalchemy.url")
    if not url:
        from umcd.settings import get_settings

        url = get_settings().db_url
    return str(url)


def _configure(**kwargs) -> None:
    context.configure(
        target_metadata=target_metadata,
        compare_type=True,
        render_as_batch=kwargs.pop("dialect_name", "") == "sqlite",  # SQLite cannot ALTER most things
        **kwargs,
    )


def run_migrations_offline() -> None:
    """Write the SQL to stdout instead of running it (``alembic upgrade --sql``)."""
    url = _database_url()
    _configure(url=url, literal_binds=True, dialect_name=url.split(":", 1)[0].split("+", 1)[0])
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_online() -> None:
    """Run the migrations on ``config.attributes["connection"]``, or on a connection to the URL."""
    connection = config.attributes.get("connection")
    if connection is not None:
        _configure(connection=connection, dialect_name=connection.dialect.name)
        with context.begin_transaction():
            context.run_migrations()
        return
    engine = create_engine_for(_database_url(), poolclass=NullPool)
    try:
        with engine.connect() as conn:
            _configure(connection=conn, dialect_name=conn.dialect.name)
            with context.begin_transaction():
                context.run_migrations()
    finally:
        engine.dispose()


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
