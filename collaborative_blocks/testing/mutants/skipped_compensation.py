"""Planted bug: a saga that skips a compensation (catch it with the ``orders`` scenario).

The workflow engine's ``refund`` compensations report success without ever reaching the
payments system: the run ends ``compensated`` while the customer's card stays charged. The
orders scenario's ``saga_atomicity`` (an effect of a compensated run is never undone) and
``money_conserved`` (charges - refunds exceed the completed orders' totals) fail.

``cblocks chaos run --scenario orders -p collaborative_blocks.testing.mutants.skipped_compensation``
"""

from __future__ import annotations

from typing import Any

from collaborative_blocks import hookimpl
from collaborative_blocks.core.messaging.envelope import JSONValue
from collaborative_blocks.core.workflows import WorkflowCoordinationEngine

__all__ = ["SKIPPED_ACTION", "cb_chaos_component", "skip_compensation"]

#: The compensation action that is never sent.
SKIPPED_ACTION = "refund"


def skip_compensation(
    engine: WorkflowCoordinationEngine, action: str = SKIPPED_ACTION
) -> WorkflowCoordinationEngine:
    """Make ``engine``'s requests for ``action`` succeed without being sent."""
    connector = engine.connector
    send = connector.request

    async def request(target: str, name: str, payload: JSONValue = None, **options: Any) -> Any:
        if name == action:
            return None  # "refunded", says the engine
        return await send(target, name, payload, **options)

    setattr(connector, "request", request)  # noqa: B010 -- replace the bound method
    return engine


@hookimpl
def cb_chaos_component(kind: str, component: Any) -> Any:
    if kind == "workflow_engine" and isinstance(component, WorkflowCoordinationEngine):
        return skip_compensation(component)
    return None
