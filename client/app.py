"""fedrec ClientApp: one per platform (channel). Thin: the work is in ``client/local.py``.

Every reply is built by ``shared.wire.build_reply``, which refuses anything outside the
allowlist. A round that would exceed the channel's privacy budget is refused with an error
reply whose reason starts with :data:`client.local.BUDGET_REFUSED`.
"""

from __future__ import annotations

from flwr.app import Context, Error, Message
from flwr.clientapp import ClientApp

from fedrec.client import local

app = ClientApp()


@app.query(local.ITEMS_QUERY)
def items(msg: Message, context: Context) -> Message:
    """Receive (or confirm the cached copy of) this channel's item matrix."""
    return Message(local.handle_items(msg.content, context), reply_to=msg)


@app.train()
def train(msg: Message, context: Context) -> Message:
    """DP-SGD on this channel's users, starting from the global model."""
    try:
        content = local.handle_train(msg.content, context)
    except local.Refused as exc:
        return Message(Error(code=local.REFUSED_CODE, reason=str(exc)), reply_to=msg)
    return Message(content, reply_to=msg)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    """Leave-last-out ranking metrics of the global model on this channel's users, within
    the node's evaluation caps."""
    try:
        content = local.handle_evaluate(msg.content, context)
    except local.Refused as exc:
        return Message(Error(code=local.REFUSED_CODE, reason=str(exc)), reply_to=msg)
    return Message(content, reply_to=msg)
