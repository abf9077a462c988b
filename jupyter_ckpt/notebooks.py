"""The notebook document that goes with a snapshot: where it is read from,
how it is checked, and putting one back.

A snapshot holds the kernel; its notebook is what the user saw beside that
kernel. It comes, in order of preference, from the browser (the document as
shown, unsaved edits included, sent with the snapshot request), from the live
shared document when jupyter-collaboration runs on the server, or from the
saved file. It is stored as nbformat JSON, written the way Jupyter writes
notebooks, so an unchanged notebook is the same bytes (and chunks) each time.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Callable
from typing import Any

import nbformat

from .errors import InvalidRequest, NotSupported
from .store import MAX_NOTEBOOK_BYTES


def document_bytes(document: Any) -> bytes:
    """A notebook (nbformat 4, as a JSON object) as stored; InvalidRequest if
    it is not one."""
    if not isinstance(document, dict) or not isinstance(document.get("cells"), list):
        raise InvalidRequest("notebook must be a notebook document (nbformat 4 JSON, with its cells)")
    try:
        node = nbformat.from_dict(document)
        if node.get("nbformat") != 4:
            raise ValueError("only nbformat 4 notebooks are stored")
        for cell in node.cells:
            cell.get("metadata", {}).pop("trusted", None)  # trust is this server's to give, not the document's
        nbformat.validate(node)
        data = nbformat.writes(node, version=4).encode()
    except (ValueError, TypeError, KeyError, AttributeError, RecursionError, nbformat.ValidationError) as e:
        message = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise InvalidRequest(f"notebook is not a valid notebook document: {message}") from None
    if len(data) > MAX_NOTEBOOK_BYTES:
        raise InvalidRequest(f"notebook is larger than {MAX_NOTEBOOK_BYTES >> 20} MiB")
    return data


def document_node(document: bytes) -> Any:
    """A stored document, as the contents manager saves it (never marked trusted)."""
    node = nbformat.reads(document.decode(), as_version=4)
    for cell in node.cells:
        cell.get("metadata", {}).pop("trusted", None)
    return node


class NotebookDocuments:
    """Reads and writes notebooks through the server's contents manager (and
    the collaboration extension's live documents, where it is installed)."""

    def __init__(
        self, contents_manager: Any, live_documents: Callable[[], Any] | None = None, log: logging.Logger | None = None
    ):
        self.contents_manager = contents_manager
        self.live_documents = live_documents or (lambda: None)
        self.log = log or logging.getLogger(__name__)

    async def current(self, path: str) -> tuple[str, bytes] | None:
        """The notebook at ``path`` as the server knows it now: (source, bytes),
        the live shared document if there is one, else the saved file; None if
        neither can be read (a snapshot is taken all the same)."""
        live = await self._live(path)
        if live is not None:
            return "live", live
        if self.contents_manager is None:
            return None
        try:
            model = await _maybe_await(self.contents_manager.get(path, content=True, type="notebook"))
            return "saved", document_bytes(dict(model["content"]))
        except Exception as e:  # deleted, renamed, unreadable: the kernel is what matters
            self.log.info("jupyter_ckpt: the notebook %s is not stored with the snapshot: %s", path, e)
            return None

    async def _live(self, path: str) -> bytes | None:
        collaboration = self.live_documents()
        if collaboration is None:
            return None
        try:
            # jupyter-collaboration's public API (jupyter_server_ydoc's YDocExtension).
            document = await _maybe_await(
                collaboration.get_document(path=path, content_type="notebook", file_format="json", copy=True)
            )
            return document_bytes(document.get()) if document is not None else None
        except Exception as e:
            self.log.info("jupyter_ckpt: no live document of %s (%s); using the saved file", path, e)
            return None

    async def put_back(self, path: str, document: bytes) -> None:
        """Replace the notebook at ``path`` with ``document``, its current
        content kept first as the file's Jupyter checkpoint (File > Revert)."""
        cm = self.require()
        try:
            if await _maybe_await(cm.file_exists(path)):
                await _maybe_await(cm.create_checkpoint(path))
            content = document_node(document)
            await _maybe_await(cm.save({"type": "notebook", "format": "json", "content": content}, path))
        except InvalidRequest:
            raise
        except Exception as e:
            raise InvalidRequest(f"cannot write the notebook {path}: {e}") from None

    async def copy(self, path: str, document: bytes | None) -> str:
        """A new notebook beside ``path``, named as Jupyter names copies, holding
        ``document`` (or, without one, the file at ``path`` as it is now)."""
        cm = self.require()
        folder = path.rsplit("/", 1)[0] if "/" in path else ""
        try:
            if document is None or await _maybe_await(cm.file_exists(path)):
                model = await _maybe_await(cm.copy(path, folder))
            else:  # the notebook was deleted since: a copy under its name
                model = await _maybe_await(cm.new(path=await _free_name(cm, path)))
            if document is not None:
                content = document_node(document)
                await _maybe_await(cm.save({"type": "notebook", "format": "json", "content": content}, model["path"]))
        except Exception as e:
            raise InvalidRequest(f"cannot copy notebook {path}: {e}") from None
        return model["path"]

    async def delete(self, path: str) -> None:
        await _maybe_await(self.require().delete(path))

    def require(self) -> Any:
        if self.contents_manager is None:
            raise NotSupported("this server has no contents manager to write notebooks with")
        return self.contents_manager


async def _free_name(cm: Any, path: str) -> str:
    folder, slash, name = path.rpartition("/")
    stem, dot, ext = name.rpartition(".") if "." in name else (name, "", "")
    for n in range(1, 1000):
        candidate = f"{folder}{slash}{stem}-Copy{n}{dot}{ext}"
        if not await _maybe_await(cm.file_exists(candidate)):
            return candidate
    raise InvalidRequest(f"no free name for a copy of {path}")


async def _maybe_await(value: Any) -> Any:
    return await value if inspect.isawaitable(value) else value
