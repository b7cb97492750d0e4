"""The audit store: SQLAlchemy models, engines and sessions, Alembic migrations, repository functions."""
