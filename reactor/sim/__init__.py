"""A local stand-in for Twenty (as stripe-mock is for Stripe): see reactor.sim.app."""

from __future__ import annotations

from reactor.sim.app import Knobs, create_sim
from reactor.sim.delivery import DeliveryKnobs

__all__ = ["DeliveryKnobs", "Knobs", "create_sim", "serve"]


def serve(
    *, host: str, port: int, token: str, members: int, tasks: int, knobs: Knobs, seed: int | None,
    legacy_task_targets: bool = False,
) -> None:  # fmt: skip
    import uvicorn

    app = create_sim(token=token, members=members, open_tasks=tasks, knobs=knobs, seed=seed,
                     legacy_task_targets=legacy_task_targets)  # fmt: skip
    print(f"twenty simulator on http://{host}:{port}/rest (token {token}); truth at /sim/state", flush=True)
    uvicorn.run(app, host=host, port=port, log_level="warning", lifespan="on")
