#!/bin/sh
# `make lab`, checked the way a user sees it work: JupyterLab starts, answers
# with its token, jupyter-ckpt says CRIU is ready, the JupyterLab extension is
# served and the demo notebook is there. Stops it afterwards. Run as root, in
# the repository (scripts/test-fresh-debian.sh runs it after make test).
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

PORT="$PORT" .venv/bin/python - "$log" <<'EOF' || { tail -n 40 "$log"; exit 1; }
import json, os, subprocess, sys, time, urllib.request

port = int(os.environ["PORT"])
deadline = time.monotonic() + 600  # make lab installs what is missing first
server = None
while server is None:
    if time.monotonic() > deadline:
        sys.exit("check-make-lab: JupyterLab did not start")
    listed = subprocess.run([".venv/bin/jupyter", "server", "list", "--json"], capture_output=True, text=True).stdout
    server = next((s for s in map(json.loads, filter(None, listed.splitlines())) if s["port"] == port), None)
    time.sleep(1)


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
