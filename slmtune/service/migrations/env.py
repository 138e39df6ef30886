"""Alembic environment: store.migrate() hands over an open connection in config.attributes."""

from alembic import context

from slmtune.service.models import Base

connection = context.config.attributes["connection"]
context.configure(connection=connection, target_metadata=Base.metadata, version_table="slm_alembic_version")
with context.begin_transaction():
    context.run_migrations()
