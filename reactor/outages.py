"""Which exceptions mean "PostgreSQL is down" or "Redis is down", as opposed to a bug.

One place decides it, for the web (an outage is a 503 with Retry-After, not a 500), the worker's supervisor (an
outage is waited out with backoff, not an exit) and jobs (an outage is retried like a Twenty outage).

A refused or reset socket surfaces as a bare OSError (or TimeoutError) from inside the driver, so a bare OSError is
attributed to PostgreSQL or Redis by the modules its traceback passes through; one raised by neither is not an
outage of ours.
"""

from __future__ import annotations

import enum
from types import TracebackType

import asyncpg
from redis import exceptions as redis_errors

RETRY_AFTER_S = 5  # what a 503 tells callers: long enough for a restart, short enough not to idle


class Dependency(enum.StrEnum):
    POSTGRES = "PostgreSQL"
    REDIS = "Redis"


_POSTGRES_DOWN: tuple[type[BaseException], ...] = (
    asyncpg.PostgresConnectionError,  # connection lost, refused by the server, failure mid-query
    asyncpg.exceptions.CannotConnectNowError,  # starting up / shutting down / in recovery (57P03)
    asyncpg.exceptions.AdminShutdownError,  # 57P01: the server was told to stop
    asyncpg.exceptions.CrashShutdownError,  # 57P02
    asyncpg.exceptions.TooManyConnectionsError,  # 53300: full, which a client cannot fix
)
# A password, role or database that does not exist: waiting will not fix it; the process should stop and say so.
_POSTGRES_MISCONFIGURED: tuple[type[BaseException], ...] = (
    asyncpg.InvalidAuthorizationSpecificationError,
    asyncpg.InvalidCatalogNameError,
)
_REDIS_DOWN: tuple[type[BaseException], ...] = (
    redis_errors.ConnectionError,  # includes BusyLoadingError (LOADING) and MaxConnectionsError
    redis_errors.TimeoutError,
)
_REDIS_MISCONFIGURED: tuple[type[BaseException], ...] = (redis_errors.AuthenticationError,)


def _causes(exc: BaseException) -> list[BaseException]:
    """The exception, what it was raised from, and what an exception group holds (bounded: chains can loop)."""
    seen: list[BaseException] = []
    pending = [exc]
    while pending and len(seen) < 32:
        current = pending.pop()
        if any(current is known for known in seen):
            continue
        seen.append(current)
        if isinstance(current, BaseExceptionGroup):
            pending.extend(current.exceptions)
        pending.extend(e for e in (current.__cause__, current.__context__) if e is not None)
    return seen


def _raised_inside(tb: TracebackType | None) -> Dependency | None:
    found = None
    while tb is not None:
        module = str(tb.tb_frame.f_globals.get("__name__", ""))
        if module.startswith("asyncpg"):
            found = Dependency.POSTGRES
        elif module.startswith("redis"):  # not arq: every job runs inside arq's frames
            found = Dependency.REDIS
        tb = tb.tb_next
    return found  # the innermost driver frame wins


def unavailable(exc: BaseException) -> Dependency | None:
    """The dependency whose outage `exc` is, or None when it is something else (a bug, bad input, Twenty).

    Jobs call this to decide "retry later" versus "fail": `if outages.unavailable(exc): raise Retry(...)`.
    """
    for cause in _causes(exc):
        if isinstance(cause, _POSTGRES_MISCONFIGURED + _REDIS_MISCONFIGURED):
            return None
        if isinstance(cause, _POSTGRES_DOWN):
            return Dependency.POSTGRES
        if isinstance(cause, _REDIS_DOWN):
            return Dependency.REDIS
        if isinstance(cause, OSError):  # ConnectionRefusedError, ConnectionResetError, TimeoutError, gaierror
            dependency = _raised_inside(cause.__traceback__)
            if dependency is not None:
                return dependency
    return None


def misconfigured(exc: BaseException) -> bool:
    """A credential or database name that is wrong: retrying cannot help."""
    return any(isinstance(cause, _POSTGRES_MISCONFIGURED + _REDIS_MISCONFIGURED) for cause in _causes(exc))


def describe(dependency: Dependency, exc: BaseException) -> str:
    """The 503's detail: names the dependency and the kind of failure, never a host, port or credential."""
    return f"{dependency.value} is unavailable ({type(exc).__name__}); retry in {RETRY_AFTER_S} s"
