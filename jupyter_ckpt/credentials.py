"""Per-kernel credentials: what lets a kernel (the ``%checkpoint`` magic) call
its server about its own snapshots, and nothing else.

A credential is an HMAC of the kernel id with a secret kept in a 0600 file, so
it survives server restarts: a kernel restored later carries the same one.
"""

from __future__ import annotations

import hashlib
import hmac
import os

from .private_files import load_or_create_key


class KernelCredentials:
    """Issues and checks kernel credentials (``CheckpointApp.kernel_credentials_class``)."""

    def __init__(self, secret_path: str | os.PathLike[str]):
        self.secret = load_or_create_key(secret_path)

    def token(self, kernel_id: str) -> str:
        """The credential of one kernel: valid for /api/ckpt/self/<that kernel> only."""
        return hmac.new(self.secret, f"jupyter-ckpt kernel {kernel_id}".encode(), hashlib.sha256).hexdigest()

    def verify(self, kernel_id: str, token: str) -> bool:
        return hmac.compare_digest(token.strip(), self.token(kernel_id))
