"""The Redis key prefix of this deployment: `tollway:<deployment id>:`.

Shared limit state lives in Redis under scope names made of database ids (`s:k2` is key
2). Under one fixed prefix, two deployments sharing a Redis, or a database re-created
under the same Redis, shared scopes: a key was limited by the leases of another
deployment's key with the same id. The id comes from Postgres (the `deployment` row made
by the first migration), so every worker and host of one deployment agrees on it and no
other deployment has it. Read once per worker at start; nothing here runs per request.
"""

from __future__ import annotations

from typing import Any


async def redis_prefix(conn: Any) -> str:
    """The prefix for this database's deployment (an asyncpg connection or pool)."""
    deployment = await conn.fetchval("SELECT id FROM deployment")
    if deployment is None:  # the row is made by the migration; never deleted
        raise RuntimeError("the deployment row is missing: run the migrations")
    return f"tollway:{deployment.hex}:"
