#!/bin/sh
# `make lab`, checked the way a user sees it work: JupyterLab starts, answers
# with its token, jupyter-ckpt says CRIU is ready, the JupyterLab extension is
# served and the demo notebook is there. Stops it afterwards. Run as root, in
# the repository, once set-up made the venv (scripts/test-fresh-debian.sh runs
# it after make test).
#
#   scripts/check-make-lab.sh [PORT]      default 18888 (not make lab's 8888)
set -eu
PORT=${1:-18888}
cd "$(dirname "$0")/.."

log=$(mktemp)
# A session of its own, so that the whole of make lab (make, jupyter) stops with it.
setsid make lab LAB_PORT="$PORT" >"$log" 2>&1 &
lab=$!
stop() { kill -TERM "-$lab" 2>/dev/null || true; wait "$lab" 2>/dev/null || true; rm -f "$log"; }
trap stop EXIT INT TERM

PORT="$PORT" LAB="$lab" .venv/bin/python - <<'EOF' || { tail -n 40 "$log"; exit 1; }
import json, os, subprocess, sys, time, urllib.request

port, lab = int(os.environ["PORT"]), int(os.environ["LAB"])


def ours(server):
    """Started by this make lab (its session), not another server on the port."""
    try:
        return os.getsid(server["pid"]) == lab
    except OSError:
        return False


deadline = time.monotonic() + 600  # make lab may still install what changed
server = None
while server is None:
    if time.monotonic() > deadline:
        sys.exit("check-make-lab: JupyterLab did not start")
    try:  # make lab ended (a zombie until this shell waits for it)?
        ended = open(f"/proc/{lab}/stat").read().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        ended = True
    if ended:
        sys.exit("check-make-lab: make lab ended")
    listed = subprocess.run([".venv/bin/jupyter", "server", "list", "--json"], capture_output=True, text=True).stdout
    server = next((s for s in map(json.loads, filter(None, listed.splitlines())) if ours(s)), None)
    time.sleep(1)
if server["port"] != port:
    sys.exit(f"check-make-lab: JupyterLab took port {server['port']}, not {port} (was {port} in use?)")


def get(path):
    request = urllib.request.Request(f"http://127.0.0.1:{port}{path}", headers={"Authorization": f"token {server['token']}"})
    with urllib.request.urlopen(request, timeout=60) as response:
        return response.read()


status = json.loads(get("/api/ckpt/status"))
assert status["criu"]["available"], status
settings = json.loads(get("/lab/api/settings"))["settings"]
assert any(s["id"].startswith("jupyter-ckpt") for s in settings), "the JupyterLab extension is not installed"
notebook = json.loads(get("/api/contents/demo.ipynb?content=0"))
print(f"check-make-lab: JupyterLab on port {port} answers; CRIU {status['criu']['version']} ready; "
      f"the extension is installed; {notebook['path']} is there")
EOF
