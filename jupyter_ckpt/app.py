"""The server extension: settings, wiring, lifecycle. Behaviour lives elsewhere."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

from jupyter_client.provisioning import KernelProvisionerFactory
from jupyter_core.paths import jupyter_data_dir
from jupyter_server.extension.application import ExtensionApp
from traitlets import Bool, Dict, Enum, Float, Int, List, Type, Unicode, default

from .bundle import DEFAULT_MAX_IMPORT_BYTES
from .credentials import KernelCredentials
from .engine import DEFAULT_RESIZABLE_FILES, CriuEngine
from .events import SCHEMA_ID as SNAPSHOT_EVENTS_SCHEMA
from .handlers import default_handlers
from .helper_client import DEFAULT_SOCKET, HelperEngine
from .manager import CheckpointManager
from .private_files import write_private_atomic
from .scheduler import AutoBackup, Schedule
from .store import DEFAULT_IMAGE_CACHE_BYTES, SnapshotStore
from .wake_on_use import waking_on_use

PROVISIONER_NAME = "ckpt-provisioner"
KERNEL_ACTIONS_SCHEMA = "https://events.jupyter.org/jupyter_server/kernel_actions/v1"
EVENT_SCHEMAS = Path(__file__).parent / "event_schemas"


class CheckpointApp(ExtensionApp):
    name = "jupyter_ckpt"

    store_root = Unicode(
        config=True,
        help="Where snapshots are kept: a local directory (created 0700) or an fsspec URL such as "
        "s3://bucket/prefix. Default: <jupyter data dir>/ckpt.",
    )
    store_state_dir = Unicode(
        "",
        config=True,
        help="Local directory for snapshots being taken, the chunk index and scratch space. "
        "Default: <store_root>/state for a local store; required for a remote one.",
    )
    store_options = Dict(
        config=True,
        help="fsspec storage options of a remote store_root, e.g. for S3-compatible storage: "
        '{"endpoint_url": "https://...", "key": "...", "secret": "..."} (s3fs).',
    )
    store_key_path = Unicode(
        "",
        config=True,
        help="The key that signs the store's manifests (created on first use, 0600). Keep it outside "
        "the store. Stores that share snapshots share this key. Default: <store_root>.key.",
    )

    image_cache_bytes = Int(
        DEFAULT_IMAGE_CACHE_BYTES,
        config=True,
        help="Bytes of CRIU images of the latest snapshots kept in the state directory, beside the "
        "store's deduplicated chunks, so that restoring them skips reassembling the images (checked "
        "against the manifest's digests first). 0 keeps none.",
    )
    incremental_snapshots = Bool(
        True,
        config=True,
        help="Save only the memory pages a kernel wrote since its previous snapshot (CRIU's dirty "
        "tracking: soft-dirty, or userfaultfd write-protect where the Linux kernel lacks soft-dirty), "
        "so the kernel is frozen for what changed, not for its size. Needs the previous snapshot's "
        "kept images (image_cache_bytes); otherwise, and for kernels holding io_uring or a device "
        "that writes memory by DMA, snapshots are full.",
    )
    lazy_restore = Bool(
        True,
        config=True,
        help="Restore a kernel's memory lazily (CRIU's lazy pages, with userfaultfd): the kernel runs "
        "again before all of its memory is back, the rest follows in the background. Used where "
        "'criu check --feature lazy_pages' passes.",
    )

    kernel_credentials_secret_path = Unicode(
        "",
        config=True,
        help="The secret that kernels' credentials (for %checkpoint) are derived from (created on first "
        "use, 0600). Kept across restarts: a kernel restored later carries the same credential. "
        "Default: <store state dir>/kernel-credentials.key.",
    )
    server_url_file = Unicode(
        "",
        config=True,
        help="Where this server writes its URL for the kernels (also ones restored later) to reach it. "
        "Default: <store state dir>/server-url.",
    )

    max_import_bytes = Int(
        DEFAULT_MAX_IMPORT_BYTES,
        config=True,
        help="The most bytes of images an imported bundle may hold (what it decompresses to); a bundle "
        "that declares more is refused before anything is written.",
    )

    use_helper = Enum(
        ["auto", "always", "never"],
        "auto",
        config=True,
        help="Run CRIU and start kernels through the jupyter-ckpt helper (a root service, see 'Deploying for "
        "many users'). 'auto': when this server is not root.",
    )
    helper_socket = Unicode(DEFAULT_SOCKET, config=True, help="The helper's unix socket.")
    store_quota_bytes = Int(
        0,
        config=True,
        help="The most bytes the snapshot store may hold (0: no limit); a snapshot or an import is refused "
        "with a clear error once the store holds that much.",
    )

    engine_class = Type(CriuEngine, config=True, help="The checkpoint engine (dump and restore of process trees).")
    store_class = Type(SnapshotStore, config=True, help="The snapshot store.")
    kernel_credentials_class = Type(
        KernelCredentials, config=True, help="Issues and checks the kernels' own credentials (the magic's)."
    )

    @default("store_root")
    def _default_store_root(self) -> str:
        return os.path.join(jupyter_data_dir(), "ckpt")

    criu_path = Unicode(
        "",
        config=True,
        help="The criu binary (4.2 or newer). Default: the first criu on PATH, /usr/local/sbin or /usr/sbin.",
    )
    criu_log_level = Int(4, config=True, help="CRIU's log level (0-4) for the logs kept with each operation.")
    resizable_files = List(
        Unicode(),
        list(DEFAULT_RESIZABLE_FILES),
        config=True,
        help="Files (fnmatch patterns) a kernel holds open that may grow after a snapshot without "
        "making it unrestorable. CRIU refuses any other open file whose size changed.",
    )
    auto_backup = Bool(
        True,
        config=True,
        help="Snapshot running kernels periodically (busy ones too: that is where a snapshot saves "
        "the most work). On by default because a long computation is the thing to protect; idle "
        "kernels are skipped, and unchanged memory costs next to nothing in the store.",
    )
    auto_backup_interval = Float(
        1800.0, config=True, help="Seconds between automatic snapshots of a kernel (default 30 minutes)."
    )
    auto_backup_keep = Int(10, config=True, help="Automatic snapshots kept per kernel; older ones are pruned.")
    auto_backup_concurrency = Int(1, config=True, help="Automatic snapshots running at once, server-wide.")
    auto_backup_tick = Float(5.0, config=True, help="How often (seconds) the schedules are checked.")
    resume_kernels = Bool(
        False,
        config=True,
        help="At start, restore the kernels that were running when the server last stopped "
        "(also after a crash) from their latest snapshots, with their notebook sessions.",
    )
    hibernate_idle_after = Float(
        0.0,
        config=True,
        help="Seconds a kernel may stay idle before it hibernates: snapshotted, its processes stopped and "
        "their memory freed, still listed; it wakes (restored under its id) when a client uses it. 0: never. "
        "With it set, jupyter_server's own idle culling (MappingKernelManager.cull_idle_timeout) hibernates "
        "the kernels it would shut down.",
    )
    use_provisioner_by_default = Bool(
        True,
        config=True,
        help="Start kernels whose kernelspec names no provisioner with jupyter_ckpt's provisioner, "
        "so that they can be snapshotted. Without it, only kernelspecs that name "
        f"'{PROVISIONER_NAME}' can be.",
    )

    fork_outbound = Enum(
        ["nat", "host"],
        "nat",
        config=True,
        help="What a kernel restored as a new kernel (a fork, in a network namespace of its own) can "
        "reach. 'host': this host's own addresses only. 'nat': also the outside world, masqueraded "
        "through this host; this turns on the host's IPv4 forwarding.",
    )

    @property
    def uses_helper(self) -> bool:
        return self.use_helper == "always" or (self.use_helper == "auto" and os.geteuid() != 0)

    def initialize_settings(self) -> None:
        if self.uses_helper:
            engine = HelperEngine(socket_path=self.helper_socket)
        else:
            engine = self.engine_class(
                self.criu_path or None, log_level=self.criu_log_level, resizable_files=tuple(self.resizable_files)
            )
        health = engine.health()
        if health.available:
            self.log.info("jupyter_ckpt: CRIU %s at %s", health.version, health.path)
        else:
            self.log.warning("jupyter_ckpt: snapshots are disabled: %s", health.reason)
        store = self.store_class(
            self.store_root,
            self.store_state_dir or None,
            self.store_key_path or None,
            dict(self.store_options),
            image_cache_bytes=self.image_cache_bytes,
            quota_bytes=self.store_quota_bytes,
        )
        for log in store.dump_logs():  # a server killed while criu dumped
            if engine.remove_network_lock(log):
                self.log.warning("jupyter_ckpt: removed the network lock a stopped dump left (%s)", log)
        for snapshot_id in store.recover():
            self.log.warning("jupyter_ckpt: snapshot %s was interrupted by a server stop; marked failed", snapshot_id)
        self.manager = CheckpointManager(
            kernel_manager=self.serverapp.kernel_manager,
            engine=engine,
            store=store,
            session_manager=self.serverapp.session_manager,
            contents_manager=self.serverapp.contents_manager,
            fork_outbound=self.fork_outbound,
            lazy_restore=self.lazy_restore,
            incremental_snapshots=self.incremental_snapshots,
            max_import_bytes=self.max_import_bytes,
            # jupyter-collaboration's documents, where it is installed (notebooks.py)
            live_documents=lambda: self.serverapp.web_app.settings.get("jupyter_server_ydoc"),
            log=self.log,
            emit=lambda data: self.serverapp.event_logger.emit(schema_id=SNAPSHOT_EVENTS_SCHEMA, data=data),
        )
        self.auto_backup_loop = AutoBackup(
            self.manager,
            Schedule(self.auto_backup, self.auto_backup_interval, self.auto_backup_keep),
            tick=self.auto_backup_tick,
            concurrency=self.auto_backup_concurrency,
            log=self.log,
        )
        secret_path = self.kernel_credentials_secret_path or str(store.state / "kernel-credentials.key")
        self.server_url_path = Path(self.server_url_file or store.state / "server-url")
        credentials = self.kernel_credentials_class(secret_path)
        self.settings.update(
            ckpt_manager=self.manager, ckpt_auto_backup=self.auto_backup_loop, ckpt_kernel_credentials=credentials
        )
        self.serverapp.event_logger.register_event_schema(EVENT_SCHEMAS / "snapshot" / "v1.yaml")
        self.serverapp.event_logger.add_listener(schema_id=KERNEL_ACTIONS_SCHEMA, listener=self._on_kernel_action)
        # The provisioner of every kernel started from now on: where the kernel
        # reaches this server, and its credential (the magic's).
        provisioner_config = self.serverapp.config.CheckpointableProvisioner
        provisioner_config.server_url_file = str(self.server_url_path)
        provisioner_config.credentials_secret_file = secret_path
        provisioner_config.credentials_class = self.kernel_credentials_class
        provisioner_config.helper_socket = self.helper_socket if self.uses_helper else ""
        self._publish_url()
        self._wake_on_use()
        if self.use_provisioner_by_default:
            factory = KernelProvisionerFactory.instance(parent=self.serverapp)
            factory.default_provisioner_name = PROVISIONER_NAME

    def _wake_on_use(self) -> None:
        """Hibernated kernels wake when a client uses them (wake_on_use.py);
        with idle hibernation on, the server's culler hibernates them."""
        # self.settings (the web app's, copied) are written back to the web app after this.
        connection_class = self.settings.get("kernel_websocket_connection_class")
        if connection_class is not None:
            self.settings["kernel_websocket_connection_class"] = waking_on_use(connection_class)
        kernel_manager = self.serverapp.kernel_manager
        if self.hibernate_idle_after > 0 and hasattr(kernel_manager, "cull_kernel_if_idle"):
            kernel_manager.cull_kernel_if_idle = self.manager.hibernation.culler(kernel_manager.cull_kernel_if_idle)
        self._idle_task: asyncio.Task | None = None

    def _start_idle_hibernation(self) -> None:
        if self.hibernate_idle_after > 0 and self._idle_task is None:
            self._idle_task = asyncio.ensure_future(self._hibernate_idle())

    async def _hibernate_idle(self) -> None:
        while True:
            await asyncio.sleep(min(self.auto_backup_tick, self.hibernate_idle_after))
            try:
                await self.manager.hibernation.hibernate_idle(self.hibernate_idle_after)
            except Exception:  # one bad round must not end idle hibernation for good
                self.log.exception("jupyter_ckpt: hibernating idle kernels failed")

    def _publish_url(self) -> None:
        """Write this server's URL where kernels (restored ones too) look for it."""
        try:
            url = self.serverapp.connection_url
        except Exception:  # no port yet
            return
        path = self.server_url_path
        try:
            if not path.exists() or path.read_text() != url:
                write_private_atomic(path, url.encode())
        except OSError:
            self.log.warning("jupyter_ckpt: cannot write %s", path)

    async def _start_jupyter_server_extension(self, serverapp: object) -> None:
        self._publish_url()
        # Kernels a server that died left running are saved and stopped, and
        # their fork namespaces removed (only this server's: see recovery.py).
        previous = await self.manager.mend_previous_run()
        listed = await self.manager.hibernation.list_again()
        if listed:
            self.log.info("jupyter_ckpt: %d hibernated kernels listed again; they wake when used", len(listed))
        self.auto_backup_loop.start()
        self._start_idle_hibernation()
        if previous and self.resume_kernels:
            restored = await self.manager.resume(previous)
            self.log.info("jupyter_ckpt: resumed %d of %d kernels of the previous run", len(restored), len(previous))

    async def _on_kernel_action(self, logger: object, schema_id: str, data: dict) -> None:
        # Also started here: embedders (and pytest-jupyter) may skip the hook above.
        self.auto_backup_loop.start()
        self._start_idle_hibernation()
        if data.get("status") == "success" and data.get("kernel_id"):
            await self.manager.kernel_action(data["kernel_id"], data.get("action", ""))
            if data.get("action") == "shutdown":
                self.auto_backup_loop.forget(data["kernel_id"])

    def initialize_handlers(self) -> None:
        self.handlers.extend(default_handlers)

    async def stop_extension(self) -> None:
        loop = getattr(self, "auto_backup_loop", None)
        if loop is not None:
            await loop.stop()
        idle = getattr(self, "_idle_task", None)
        if idle is not None:
            idle.cancel()
            await asyncio.gather(idle, return_exceptions=True)
        manager = getattr(self, "manager", None)
        if manager is not None:
            await manager.stop()
