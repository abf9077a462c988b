"""jupyter_ckpt: snapshot and restore live Jupyter kernels with CRIU."""

from ._version import __version__


def _jupyter_server_extension_points() -> list[dict]:
    from .app import CheckpointApp

    return [{"module": "jupyter_ckpt", "app": CheckpointApp}]


def _jupyter_labextension_paths() -> list[dict]:
    return [{"src": "labextension", "dest": "jupyter-ckpt"}]


__all__ = ["__version__"]


def load_ipython_extension(ipython):  # %load_ext jupyter_ckpt
    from .magic import load_ipython_extension as load

    load(ipython)


def checkpoint(label: str = ""):
    """Snapshot the kernel this runs in; see jupyter_ckpt.magic.checkpoint."""
    from .magic import checkpoint as take

    return take(label)
