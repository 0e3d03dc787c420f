"""The database every record and campaign lives in: engine and URLs (SQLite by default,
PostgreSQL for production) and the Alembic migrations run at start-up.
"""
