# JupyterHub with jupyter-ckpt for its users (local system users, one
# single-user server each, started by the hub as root). The helper runs on the
# same machine (jupyter-ckpt-helper.service); the users' servers find it on its
# default socket and use it because they are not root.
c = get_config()  # noqa: F821

c.JupyterHub.spawner_class = "localprocess"  # or systemdspawner / sudospawner
c.Spawner.args = [
    "--ServerApp.jpserver_extensions=jupyter_ckpt=True",
    # Where each user's snapshots go (their own, 0700), and how much they may hold.
    "--CheckpointApp.store_quota_bytes=53687091200",  # 50 GiB
]
# The environment the users' servers run from must be one they can execute,
# with jupyter_ckpt and jupyterhub installed.
c.Spawner.cmd = ["/opt/jupyter-ckpt/bin/jupyterhub-singleuser"]
# jupyter_server's idle culler (or JupyterHub's idle-culler service) may stop
# kernels: take a snapshot first with auto-backup, on by default.
