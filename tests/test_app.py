"""The extension's wiring: pluggable parts are swapped through config."""

from __future__ import annotations

import pytest

from jupyter_ckpt.credentials import KernelCredentials
from jupyter_ckpt.engine import CriuEngine
from jupyter_ckpt.provisioner import CheckpointableProvisioner
from jupyter_ckpt.store import SnapshotStore


class RecordingStore(SnapshotStore):
    """A store that counts its listings: stands for a deployment's own store class."""

    listings = 0

    def list(self, *args, **kwargs):
        type(self).listings += 1
        return super().list(*args, **kwargs)


class FixedEngine(CriuEngine):
    pass


class Credentials(KernelCredentials):
    pass


@pytest.fixture
def jp_server_config(store_root, tmp_path):
    return {
        "ServerApp": {"jpserver_extensions": {"jupyter_ckpt": True}},
        "CheckpointApp": {
            "store_root": str(store_root),
            "store_class": f"{__name__}.RecordingStore",
            "engine_class": f"{__name__}.FixedEngine",
            "kernel_credentials_class": f"{__name__}.Credentials",
            "kernel_credentials_secret_path": str(tmp_path / "secret.key"),
        },
    }


async def test_engine_store_and_credentials_are_swapped_through_config(jp_fetch, jp_serverapp, tmp_path):
    manager = jp_serverapp.web_app.settings["ckpt_manager"]
    assert type(manager.store) is RecordingStore and type(manager.engine) is FixedEngine
    credentials = jp_serverapp.web_app.settings["ckpt_kernel_credentials"]
    assert type(credentials) is Credentials
    assert (tmp_path / "secret.key").stat().st_mode & 0o777 == 0o600
    before = RecordingStore.listings
    resp = await jp_fetch("api", "ckpt", "snapshots")
    assert resp.code == 200 and RecordingStore.listings == before + 1
    # Every kernel's provisioner gets the same settings (not class state).
    provisioner = CheckpointableProvisioner(kernel_id="k", kernel_spec=None, parent=jp_serverapp.kernel_manager)
    assert provisioner.credentials_class is Credentials
    assert provisioner.credentials_secret_file == str(tmp_path / "secret.key")
    assert open(provisioner.server_url_file).read() == jp_serverapp.connection_url
