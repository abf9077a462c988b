#!/bin/sh
# Debian packages jupyter-ckpt needs at run time and for its tests. Run as root.
# Quick when everything is already installed: apt is only called for what's missing.
set -eu

# chromium: the browser the UI tests drive (through Playwright, no download).
PACKAGES="python3 python3-venv python3-dev tini util-linux iproute2 nftables git make chromium fonts-dejavu-core r-cran-irkernel"

missing=""
for p in $PACKAGES; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing="$missing $p"
done
if [ -z "$missing" ]; then
    echo "install-system: all packages present"
    exit 0
fi
[ "$(id -u)" = 0 ] || { echo "install-system: ERROR: run as root to install:$missing" >&2; exit 1; }
echo "install-system: installing$missing"
apt-get update -q >/dev/null
DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends $missing >/dev/null
