"""`reactor webhook install|status`: reactor's webhook subscription in Twenty, managed through its REST API."""

from __future__ import annotations

import hmac
import ipaddress
import secrets
import socket
from dataclasses import dataclass
from urllib.parse import urlsplit

from reactor.twenty import TwentyClient, Webhook

OPERATIONS = ("person.created", "task.*")
DESCRIPTION = "reactor: follow-ups for new people, member loads from task events"


@dataclass(frozen=True)
class Installed:
    webhook: Webhook
    created: bool
    secret: str | None  # what to put in TWENTY_WEBHOOK_SECRET


def _same_url(a: str, b: str) -> bool:
    return a.rstrip("/") == b.rstrip("/")


async def install(twenty: TwentyClient, url: str) -> Installed:
    """Create the subscription for `url`, or bring an existing one for it up to date (operations)."""
    for hook in await twenty.list_webhooks():
        if _same_url(hook.target_url, url):
            updated = await twenty.update_webhook(hook.id, OPERATIONS, DESCRIPTION)
            return Installed(updated, created=False, secret=updated.secret or hook.secret)
    secret = secrets.token_hex(32)
    created = await twenty.create_webhook(url, OPERATIONS, DESCRIPTION, secret)
    return Installed(created, created=True, secret=created.secret or secret)


def covers(hook: Webhook) -> list[str]:
    """Which operations reactor needs the subscription lacks."""
    have = set(hook.operations)
    missing = []
    for operation in ("person.created", "task.created", "task.updated", "task.deleted", "task.destroyed"):
        name, action = operation.split(".")
        if not have & {operation, f"{name}.*", f"*.{action}", "*.*"}:
            missing.append(operation)
    return missing


def secret_matches(hook: Webhook, configured: str | None) -> bool | None:
    if hook.secret is None or configured is None:
        return None
    return hmac.compare_digest(hook.secret.encode(), configured.encode())


def is_private(url: str) -> bool:
    """Whether Twenty's outbound safe mode would refuse to call this URL (private, loopback, link-local)."""
    host = urlsplit(url).hostname or ""
    try:
        addresses = {str(info[4][0]) for info in socket.getaddrinfo(host, None)}
    except OSError:
        return host in {"localhost"} or host.endswith((".local", ".internal"))
    return any(
        (ip := ipaddress.ip_address(address.split("%")[0])).is_private or ip.is_loopback or ip.is_link_local
        for address in addresses
    )
