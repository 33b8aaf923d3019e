"""Storage backends, and the one place where the configuration chooses one.

``--persist-dir`` keeps every store in its own SQLite file (``sds.backends.sqlite``);
``--database-url`` keeps every store in one PostgreSQL database
(``sds.backends.postgres``, imported only when configured); neither is relay
only. Everything else uses the shapes of ``sds.backends.base``.
"""

from __future__ import annotations

from typing import Any

from sds.backends.base import Storage
from sds.background import Tasks
from sds.config import Config, check_persist_dir
from sds.metrics import Metrics


async def open_storage(
    config: Config, metrics: Metrics, *, tasks: Tasks | None = None
) -> Storage[Any] | None:
    """The storage ``config`` asks for, ready to serve (None: relay only).

    Raises StorageError (one line, never the database password) when PostgreSQL
    cannot be reached or refuses, and ConfigError when the persist dir is unusable.
    """
    if config.database_url is not None:
        from sds.backends.postgres import PgStorage

        storage = PgStorage(
            config.database_url,
            value_mode=config.value_mode,
            pool_size=config.database_pool_size,
            close_grace=config.store_close_grace,
            metrics=metrics,
        )
        await storage.start()
        return storage
    if config.persist_dir is not None:
        from sds.backends.sqlite import Storage as SqliteStorage

        check_persist_dir(config.persist_dir)
        return SqliteStorage(
            config.persist_dir,
            sync=config.sync,
            value_mode=config.value_mode,
            max_open=config.max_open_stores,
            close_grace=config.store_close_grace,
            metrics=metrics,
            tasks=tasks,
        )
    return None
