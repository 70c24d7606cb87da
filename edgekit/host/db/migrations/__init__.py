"""Alembic migrations of the fleet database (``edgekit db upgrade``; docs/database.md)."""
