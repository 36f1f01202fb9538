"""Alembic environment: connects to MEOWMX_DSN (a URL or key=value libpq string)."""

import os

import psycopg
from alembic import context
from sqlalchemy import create_engine

engine = create_engine(
    "postgresql+psycopg://", creator=lambda: psycopg.connect(os.environ["MEOWMX_DSN"])
)
with engine.connect() as connection:
    context.configure(connection=connection, target_metadata=None)
    with context.begin_transaction():
        context.run_migrations()
