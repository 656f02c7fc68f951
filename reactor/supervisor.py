"""Keeps the worker running through PostgreSQL and Redis outages.

arq's worker ends at the first Redis error (a `ConnectionError` out of its poll loop, then another from its own
`close()`), and the process exited. `supervise` runs one worker at a time on freshly opened resources; when the run
ends for any reason but SIGTERM/SIGINT, it tears everything down, waits (backoff with jitter, reset after a run
that lasted), and starts again. It exits only on a signal (0) or a configuration error (2): a bad routing setting,
or a password or database name PostgreSQL/Redis refuse. A job in flight when Redis died is cancelled; its lead or
follow-up is still owed in PostgreSQL, and the sweep picks it up again.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import signal
import sys
from collections.abc import Awaitable, Callable

from arq.worker import Worker

from reactor import outages
from reactor.resources import Resources, open_resources
from reactor.settings import Settings

log = logging.getLogger("reactor.supervisor")

FIRST_DELAY_S = 0.5
MAX_DELAY_S = 30.0
HEALTHY_RUN_S = 60.0  # a run this long was not a crash loop: the next wait starts small again


def next_delay(previous: float) -> float:
    return min(MAX_DELAY_S, max(FIRST_DELAY_S, previous * 2))


async def supervise(
    settings: Settings,
    build: Callable[[Resources], Worker],
    check_config: Callable[[Resources], Awaitable[str | None]],
) -> int:
    loop = asyncio.get_running_loop()
    stopping = asyncio.Event()
    current: list[Worker] = []
    insisting: set[asyncio.Task[None]] = set()

    def on_signal(signum: signal.Signals) -> None:
        log.info("worker.stopping signal=%s", signum.name)
        stopping.set()
        if current:  # arq's graceful stop: no new jobs, JOB_COMPLETION_WAIT_S for those in flight, then cancel
            current[0].handle_sig_wait_for_completion(signum)
            task = loop.create_task(_insist_on_stopping(current[0]))
            insisting.add(task)
            task.add_done_callback(insisting.discard)

    def own_signals() -> None:  # arq's Worker() installs its own handlers; ours replace them
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, on_signal, signum)

    own_signals()
    delay = 0.0
    try:
        while not stopping.is_set():
            started = loop.time()
            try:
                status = await _run_once(settings, build, check_config, current, own_signals, stopping)
            except Exception as exc:
                if outages.misconfigured(exc):
                    print(f"reactor: invalid configuration:\n  {type(exc).__name__}: {exc}", file=sys.stderr)
                    return 2
                dependency = outages.unavailable(exc)
                if dependency is None:
                    log.error("worker.crashed error=%s (restarting)", type(exc).__name__, exc_info=exc)
                else:
                    log.warning("worker.dependency_down dependency=%s error=%s (restarting when it is back)",
                                dependency.value, type(exc).__name__)  # fmt: skip
            else:
                return status
            if stopping.is_set():
                break
            delay = FIRST_DELAY_S if loop.time() - started > HEALTHY_RUN_S else next_delay(delay)
            wait = random.uniform(delay / 2, delay)
            log.info("worker.restart_in seconds=%.1f", wait)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stopping.wait(), wait)
    finally:
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(signum)
    return 0


async def _run_once(
    settings: Settings,
    build: Callable[[Resources], Worker],
    check_config: Callable[[Resources], Awaitable[str | None]],
    current: list[Worker],
    own_signals: Callable[[], None],
    stopping: asyncio.Event,
) -> int:
    """One worker on fresh resources. Returns an exit status: 0 after a signal, 2 for a bad configuration; raises
    whatever else ended the run."""
    async with open_resources(settings) as res:
        if problem := await check_config(res):
            print(f"reactor: invalid configuration:\n  {problem}", file=sys.stderr)
            return 2
        worker = build(res)
        own_signals()
        if stopping.is_set():  # the signal came while the resources were opening
            return 0
        current.append(worker)
        try:
            await worker.async_run()
        except asyncio.CancelledError:  # how arq ends a run on a signal
            if stopping.is_set():
                await _close(worker)
                return 0
            raise
        except BaseException:
            await _abandon(worker)
            raise
        finally:
            current.clear()
    return 0  # async_run returned by itself (burst mode only)


async def _insist_on_stopping(worker: Worker) -> None:
    """arq stops a worker by cancelling its main task once the jobs in flight are done. A cancel that lands while
    the startup hook awaits an HTTP connect can come out as a connection error, which the hook handles, and the
    worker ran on. So: cancel it again, every half second, once no job is left (or the graceful wait is over)."""
    loop = asyncio.get_running_loop()
    give_up_at = loop.time() + float(getattr(worker, "_job_completion_wait", 0) or 0) + 5
    main = worker.main_task
    while main is not None and not main.done():
        await asyncio.sleep(0.5)
        if all(task.done() for task in worker.tasks.values()) or loop.time() > give_up_at:
            main.cancel()


async def _close(worker: Worker) -> None:
    try:
        await worker.close()
    except Exception as exc:  # Redis went away during the graceful stop: nothing left to tidy
        log.warning("worker.close_failed error=%s", type(exc).__name__)
        await _shutdown_hook(worker)


async def _abandon(worker: Worker) -> None:
    """The run ended on an error: cancel the jobs in flight (their work is still owed in PostgreSQL), run the
    shutdown hook (it stops the sweep ticker), and let the resources close."""
    for task in worker.tasks.values():
        task.cancel()
    await asyncio.gather(*worker.tasks.values(), return_exceptions=True)
    await _shutdown_hook(worker)


async def _shutdown_hook(worker: Worker) -> None:
    if worker.on_shutdown is not None:
        try:
            await worker.on_shutdown(worker.ctx)
        except Exception as exc:
            log.warning("worker.shutdown_hook_failed error=%s", type(exc).__name__)
