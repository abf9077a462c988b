"""Run as an ordinary user by the tests (test_many_users.py): one request to
the helper, with the fds it names opened here, as that user; prints the
helper's answer (or its error) as JSON.

    python -m tests.helper_calls SOCKET '{"op": ..., "dirs": [...], "pipes": 2, ...}'

``dirs`` are opened as directories and passed first, then the write ends of
``pipes`` new pipes (as a kernel's stdout and stderr: a file opened outside the
kernel's mount namespace could not be restored); every other key goes into
the request as is.
"""

from __future__ import annotations

import json
import os
import sys

from jupyter_ckpt import errors
from jupyter_ckpt.helper_client import request


def main() -> None:
    socket_path, spec = sys.argv[1], json.loads(sys.argv[2])
    op = spec.pop("op")
    fds = [os.open(d, os.O_RDONLY | os.O_DIRECTORY) for d in spec.pop("dirs", [])]
    fds += [os.pipe()[1] for _ in range(spec.pop("pipes", 0))]
    try:
        answer = request(socket_path, op, fds, **spec)
    except errors.CheckpointError as e:
        answer = {"ok": False, "error_type": type(e).__name__, "error": str(e)}
    print(json.dumps(answer))


if __name__ == "__main__":
    main()
