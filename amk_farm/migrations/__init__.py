"""Alembic migrations of the registry schema (`amk_farm.db`); applied by `amk-farm db upgrade`
and automatically on first use."""
