"""The server's kernel websocket, waking hibernated kernels (hibernation.py).

A mixin over whichever connection class the server uses: opening a
websocket to a hibernated kernel (a notebook opened) wakes it before the
connection is made; a message sent to one that is hibernated, going to disk
or waking is held and sent once it runs again, in order.
"""

from __future__ import annotations

from typing import Any

from .errors import CheckpointError


class WakeOnUse:
    kernel_id: str
    websocket_handler: Any
    log: Any

    @property
    def _hibernation(self) -> Any:
        return self.websocket_handler.settings["ckpt_manager"].hibernation

    async def prepare(self) -> None:
        hibernation = self._hibernation
        if hibernation.holds_messages(self.kernel_id):
            try:
                await hibernation.wake(self.kernel_id)
            except CheckpointError as e:  # the connection then fails as for a kernel that does not answer
                self.log.warning("jupyter_ckpt: kernel %s not woken for a client: %s", self.kernel_id, e)
        await super().prepare()  # type:ignore[misc]

    def handle_incoming_message(self, incoming_msg: Any) -> None:
        hibernation = self._hibernation
        if hibernation.holds_messages(self.kernel_id):
            send = super().handle_incoming_message  # type:ignore[misc]
            hibernation.hold(self.kernel_id, lambda: send(incoming_msg))
            return
        super().handle_incoming_message(incoming_msg)  # type:ignore[misc]


def waking_on_use(connection_class: type) -> type:
    """``connection_class`` with WakeOnUse (itself if it has it already)."""
    if issubclass(connection_class, WakeOnUse):
        return connection_class
    return type(f"WakeOnUse{connection_class.__name__}", (WakeOnUse, connection_class), {})
