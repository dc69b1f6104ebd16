"""The three systems of examples/workflows/order.yaml, served in-process.

``cblocks workflow run ... --handlers examples/workflows/order_systems.py`` imports this file
and calls :func:`register` with the engine's broker. In a deployment each system would run in
its own process on a shared ``MESSAGE_BROKER_URL`` instead.
"""

from __future__ import annotations

from collaborative_blocks import Message, MessageBroker, SystemConnector


def register(broker: MessageBroker) -> None:
    inventory = SystemConnector("inventory", broker)
    risk = SystemConnector("risk", broker)
    payments = SystemConnector("payments", broker)
    shipping = SystemConnector("shipping", broker)

    async def reserve(message: Message) -> dict[str, object]:
        payload = message.payload if isinstance(message.payload, dict) else {}
        return {"reservation": f"r-{payload.get('order')}"}

    async def release(message: Message) -> dict[str, object]:
        return {"released": True}

    async def score(message: Message) -> dict[str, object]:
        payload = message.payload if isinstance(message.payload, dict) else {}
        amount = payload.get("amount")
        return {"score": 90 if isinstance(amount, int) and amount > 10_000 else 10}

    async def charge(message: Message) -> dict[str, object]:
        payload = message.payload if isinstance(message.payload, dict) else {}
        return {"charge_id": f"c-{payload.get('order')}", "amount": payload.get("amount")}

    async def refund(message: Message) -> dict[str, object]:
        return {"refunded": True}

    async def ship(message: Message) -> dict[str, object]:
        payload = message.payload if isinstance(message.payload, dict) else {}
        if payload.get("fail"):
            raise RuntimeError("the carrier refused the parcel")
        return {"tracking": f"t-{payload.get('order')}"}

    inventory.on_command("reserve", reserve)
    inventory.on_command("release", release)
    risk.on_command("score", score)
    payments.on_command("charge", charge)
    payments.on_command("refund", refund)
    shipping.on_command("ship", ship)
