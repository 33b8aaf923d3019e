"""Typed keys for what the aiohttp Application holds (no module globals)."""

from __future__ import annotations

from concurrent.futures import Executor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from aiohttp import web

from sds.auth import AuthFailures
from sds.background import Tasks
from sds.chunks import ChunkBudget
from sds.config import Config
from sds.metrics import Metrics

if TYPE_CHECKING:
    from typing import Any

    from sds.backends.base import Storage
    from sds.connections import Client
    from sds.health import StorageHealth
    from sds.ownership import Ownership
    from sds.relay import Relay
    from sds.signalling import Signalling


@dataclass
class ServerState:
    """Per-server bookkeeping shared by the endpoints."""

    metrics: Metrics
    auth_failures: AuthFailures
    chunk_budget: ChunkBudget
    clients: set[Client] = field(default_factory=set)
    shutting_down: bool = False


CONFIG = web.AppKey("config", Config)
METRICS = web.AppKey("metrics", Metrics)
STATE = web.AppKey("state", ServerState)
# Annotated rather than passed a class: these modules import this one.
RELAY: web.AppKey[Relay] = web.AppKey("relay")
STORAGE: web.AppKey[Storage[Any] | None] = web.AppKey("storage")
SIGNALLING: web.AppKey[Signalling] = web.AppKey("signalling")
HEALTH: web.AppKey[StorageHealth | None] = web.AppKey("health")
OWNERSHIP: web.AppKey[Ownership | None] = web.AppKey("ownership")
"""Store ownership among the processes of one lock dir (None: a process on its own)."""
TASKS = web.AppKey("tasks", Tasks)
"""Background tasks of the server: cancelled and awaited at shutdown."""
MAINTENANCE: web.AppKey[Executor] = web.AppKey("maintenance")
"""The bounded threads of maintenance (compaction): never the ones serving needs."""
