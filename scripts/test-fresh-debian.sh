#!/bin/sh
# `make test`, then `make lab` (scripts/check-make-lab.sh), then both again
# (quick when nothing changed), on a fresh Debian of another release than this
# machine's (default: Debian 13, "trixie"), in a chroot made by debootstrap from
# this machine's mirror: the README promises that set-up works on a fresh
# Debian 12 or 13.
#
# The chroot shares this machine's kernel and network namespace; that is all a
# fresh machine of that release would not have from us. It holds a clone of this
# repository's HEAD (commit first), nothing else of this machine; the chroot has
# only what debootstrap's minimal variant installs, plus git and make (to clone
# and to run make). Do not run other tests at the same time: both suites would
# add the same tables to the network namespace they share. About an hour on two
# cores. Run as root.
#
#   scripts/test-fresh-debian.sh [SUITE]      e.g. trixie (default), bookworm
#   CHROOT_DIR=...                            where the chroot goes (removed first)
#   KEEP_CHROOT=1                             keep it afterwards (to look inside)
set -eu

SUITE=${1:-trixie}
ROOT=${CHROOT_DIR:-/var/tmp/jupyter-ckpt-$SUITE}
REPO=$(cd "$(dirname "$0")/.." && pwd)

say() { echo "test-fresh-debian: $*"; }
die() { echo "test-fresh-debian: ERROR: $*" >&2; exit 1; }

[ "$(id -u)" = 0 ] || die "must run as root (debootstrap, chroot, mounts)"

. "$(dirname "$0")/debian-mirror.sh"
MIRROR=$(mirror_uri | head -n 1)
[ -n "$MIRROR" ] || die "cannot find a Debian mirror in /etc/apt/sources.list{,.d/debian.sources}"

command -v debootstrap >/dev/null || {
    say "installing debootstrap"
    apt-get update -q >/dev/null
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends debootstrap >/dev/null
}

# The chroot's mounts live in a mount namespace of their own (unshare), gone
# when it ends: nothing is left mounted here, and rm -rf cannot reach this
# machine's /dev or /sys through the chroot.
cleanup() {
    [ -n "${KEEP_CHROOT:-}" ] || rm -rf --one-file-system "$ROOT"
}

# --one-file-system: whatever a killed debootstrap left mounted in it stays.
rm -rf --one-file-system "$ROOT"
trap cleanup EXIT
trap 'exit 130' INT TERM

say "debootstrap $SUITE from $MIRROR into $ROOT"
debootstrap --variant=minbase --include=ca-certificates,git,make "$SUITE" "$ROOT" "$MIRROR" \
    >"$ROOT.debootstrap.log" 2>&1 || { tail -n 30 "$ROOT.debootstrap.log"; die "debootstrap failed"; }
rm -f "$ROOT.debootstrap.log"
say "$(cat "$ROOT/etc/os-release" | sed -n 's/^PRETTY_NAME=//p')"

cp /etc/resolv.conf "$ROOT/etc/resolv.conf"
echo "jupyter-ckpt-$SUITE" >"$ROOT/etc/hostname"
# This machine's network, as a fresh machine on it would have it: certificate
# authorities added locally (a proxy's, say), pip's system-wide settings and
# npm's, and the variables that point tools at them.
if ls /usr/local/share/ca-certificates/*.crt >/dev/null 2>&1; then
    cp /usr/local/share/ca-certificates/*.crt "$ROOT/usr/local/share/ca-certificates/"
    chroot "$ROOT" update-ca-certificates >/dev/null
fi
[ ! -f /etc/pip.conf ] || cp /etc/pip.conf "$ROOT/etc/pip.conf"
[ ! -f "$HOME/.npmrc" ] || cp "$HOME/.npmrc" "$ROOT/root/.npmrc"
set --  # as arguments, each whole (a no_proxy list may hold spaces)
for v in SSL_CERT_FILE SSL_CERT_DIR REQUESTS_CA_BUNDLE CURL_CA_BUNDLE PIP_CERT PIP_INDEX_URL PIP_DEFAULT_TIMEOUT \
    NODE_EXTRA_CA_CERTS GIT_SSL_CAINFO http_proxy https_proxy no_proxy HTTP_PROXY HTTPS_PROXY NO_PROXY; do
    eval "value=\${$v-}"
    [ -z "$value" ] || set -- "$@" "$v=$value"
done
git clone -q "$REPO" "$ROOT/root/jupyter-ckpt"
say "make test in a clone of $(git -C "$REPO" rev-parse --short HEAD)"
start=$(date +%s)
status=0
# What a booted machine has mounted, and the chroot's root as the root of its
# mount namespace (pivot_root): CRIU reads the mount tree and cannot make sense
# of mounts outside its root. /sys and /dev are this machine's.
ROOT="$ROOT" unshare --mount --propagation private sh -eu -c '
    mount --bind "$ROOT" "$ROOT"
    mount -t proc proc "$ROOT/proc"
    mount --rbind /sys "$ROOT/sys"
    mount --rbind /dev "$ROOT/dev"
    mount -t tmpfs -o mode=1777 shm "$ROOT/dev/shm"
    mount -t tmpfs -o mode=755 run "$ROOT/run"
    mkdir -p "$ROOT/.old-root"
    cd "$ROOT"
    pivot_root . .old-root
    umount -l /.old-root
    rmdir /.old-root
    exec /usr/bin/env -i HOME=/root TERM=dumb LANG=C.UTF-8 \
        PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin "$@" \
        sh -c "cd /root/jupyter-ckpt && make test && scripts/check-make-lab.sh && scripts/time-make-again.sh"
' sh "$@" || status=$?
say "make test, make lab and both again on $SUITE: exit $status after $(( $(date +%s) - start )) s"
exit $status
