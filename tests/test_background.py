"""Background tasks: the server's are tracked on the application and drained at shutdown."""

from __future__ import annotations

import asyncio

from sds.appkeys import STATE, TASKS
from sds.background import Tasks
from tests.conftest import ServerFactory


async def test_a_task_the_server_spawned_is_cancelled_and_awaited_at_shutdown(
    make_server: ServerFactory,
) -> None:
    server = await make_server(persist=True)
    tasks = server.app[TASKS]
    cleaned_up: list[str] = []

    async def forever() -> None:
        try:
            await asyncio.sleep(3600)
        finally:
            await asyncio.sleep(0)  # the cancelled task still runs its clean-up to the end
            cleaned_up.append("done")

    task = tasks.spawn(forever())
    await asyncio.sleep(0)
    await server.server.close()
    assert task.cancelled()
    assert cleaned_up == ["done"]
    assert len(tasks) == 0


async def test_a_close_the_server_starts_is_one_of_its_tasks(make_server: ServerFactory) -> None:
    server = await make_server()
    client = await server.connect("s")
    tasks = server.app[TASKS]
    (served,) = server.app[STATE].clients
    served.close(1001, "bye")
    assert len(tasks) == 1
    assert await client.wait_closed() == 1001


async def test_drain_lets_tasks_finish_within_the_grace_then_cancels_the_rest() -> None:
    tasks = Tasks()
    quick = tasks.spawn(asyncio.sleep(0.01, result="finished"))
    slow = tasks.spawn(asyncio.sleep(3600))
    await tasks.drain(grace=0.5)
    assert quick.result() == "finished"
    assert slow.cancelled()
    assert len(tasks) == 0
