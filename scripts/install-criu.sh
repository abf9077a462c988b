#!/bin/sh
# Install CRIU (>= 4.2.1) built from Debian's source package, and keep pycriu's
# sources from the same build so that each venv can install them.
#
# Why build: Debian 12's criu 3.17 cannot parse the vDSO layout of Linux >= 6.16,
# and criu 4.1 fails to dump TCP sockets there. 4.2.1 and newer work.
#
# The patches in patches/criu/ are applied to the source before the build (each
# says why); the installed build records which ones it carries.
#
# Skips everything when a good criu (version >= MIN_VERSION, `criu check` passing,
# built with the current patches) and its pycriu sources are already installed.
# Run as root.
set -eu

PATCHES_DIR=$(cd "$(dirname "$0")/../patches/criu" && pwd)

MIN_VERSION=4.2.1
PREFIX=${CRIU_PREFIX:-/usr/local}
PYCRIU_SRC="$PREFIX/share/criu/pycriu-src"   # pycriu's source tree from the build
PATCHES_STAMP="$PREFIX/share/criu/jupyter-ckpt-patches"  # checksums of the patches built in
WORK=${CRIU_BUILD_DIR:-/var/cache/jupyter-ckpt/criu-build}
SRC_LIST=/etc/apt/sources.list.d/jupyter-ckpt-criu-src.sources

say() { echo "install-criu: $*"; }
die() { echo "install-criu: ERROR: $*" >&2; exit 1; }

installed_version() {
    "$PREFIX/sbin/criu" --version 2>/dev/null | sed -n 's/^Version: *//p'
}

criu_is_good() {
    v=$(installed_version)
    [ -n "$v" ] || return 1
    dpkg --compare-versions "$v" ge "$MIN_VERSION" || return 1
    "$PREFIX/sbin/criu" check >/dev/null 2>&1 || return 1
    [ -f "$PYCRIU_SRC/pycriu/rpc_pb2.py" ] || return 1
    [ "$(patch_sums)" = "$(cat "$PATCHES_STAMP" 2>/dev/null)" ]
}

patch_sums() {
    (cd "$PATCHES_DIR" && sha256sum -- *.patch)
}

if criu_is_good; then
    say "criu $(installed_version) already installed and 'criu check' passes; nothing to do"
    exit 0
fi

[ "$(id -u)" = 0 ] || die "must run as root (apt-get and installing into $PREFIX)"

# Debian's source lists: reuse the mirror this machine already uses for its
# binary packages; add only deb-src entries for the suites that carry CRIU >= 4.2.
. "$(dirname "$0")/debian-mirror.sh"
URI=$(mirror_uri | head -n 1)
[ -n "$URI" ] || die "cannot find a Debian mirror in /etc/apt/sources.list{,.d/debian.sources}"

# Check-Valid-Until: no, for these source entries only: sid's and experimental's
# Release files are valid for a week, and a mirror that lags behind (or a
# snapshot of one) serves them expired; apt-get update then fails the whole
# install. They are still checked against Debian's signing keys, and the source
# taken must still be >= MIN_VERSION.
say "deb-src entries (sid, experimental) for $URI in $SRC_LIST"
cat >"$SRC_LIST" <<EOF
Types: deb-src
URIs: $URI
Suites: sid experimental
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
Check-Valid-Until: no
EOF

say "installing build dependencies"
apt-get update -q >/dev/null
DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends \
    build-essential pkgconf xz-utils patch \
    libbsd-dev libcap-dev libgnutls28-dev libnet1-dev libnftables-dev libnl-3-dev \
    libprotobuf-c-dev libprotobuf-dev protobuf-c-compiler protobuf-compiler \
    python3-protobuf uuid-dev nftables iproute2 >/dev/null

# Newest first. Debian's pools keep only each suite's current files, so a listed
# version may fail to download: fall back to the next one.
versions=$(apt-cache showsrc criu | sed -n 's/^Version: *//p' | sort -u |
    while read -r v; do
        dpkg --compare-versions "$v" ge "$MIN_VERSION" && echo "$v"
    done | sort -r -V)
[ -n "$versions" ] || die "no criu source >= $MIN_VERSION in the Debian source lists (apt-cache showsrc criu)"

mkdir -p "$WORK"
cd "$WORK"
tarball=""
for v in $versions; do
    upstream=${v%-*}
    say "trying criu source $v"
    rm -f criu_*
    # The .dsc or debian.tar may 404 while the orig tarball downloads; the
    # orig tarball is all we need.
    apt-get source --download-only "criu=$v" >/dev/null 2>&1 || true
    if [ -f "criu_${upstream}.orig.tar.xz" ] || [ -f "criu_${upstream}.orig.tar.gz" ]; then
        tarball=$(ls criu_"${upstream}".orig.tar.* | head -n 1)
        break
    fi
    say "criu $v could not be downloaded; trying an older one"
done
[ -n "$tarball" ] || die "none of the listed criu sources ($versions) could be downloaded"

rm -rf src && mkdir src
tar -xf "$tarball" -C src --strip-components=1
cd src
for p in "$PATCHES_DIR"/*.patch; do
    say "applying $(basename "$p")"
    patch -p1 --quiet <"$p" || die "patch $(basename "$p") does not apply to $(basename "$tarball")"
done
say "building $(basename "$tarball")"
make -j"$(nproc)" criu >build.log 2>&1 || { tail -n 30 build.log; die "criu build failed"; }
make lib >>build.log 2>&1 || { tail -n 30 build.log; die "pycriu build failed"; }

install -D -m 0755 criu/criu "$PREFIX/sbin/criu"
rm -rf "$PYCRIU_SRC" && mkdir -p "$PYCRIU_SRC"
cp -r lib/pyproject.toml lib/setup.py lib/setup.cfg lib/pycriu "$PYCRIU_SRC/"
find "$PYCRIU_SRC" \( -name '*.o' -o -name '*.d' -o -name Makefile \) -delete

# CRIU caches what it learnt of the kernel (kerndat) in /run; a cache the
# previous build wrote may lack what this one checks for.
rm -f /run/criu.kdat /run/criu.kdat.tmp
"$PREFIX/sbin/criu" check || die "'criu check' fails with the freshly built criu $(installed_version)"
patch_sums >"$PATCHES_STAMP"
say "installed criu $(installed_version) to $PREFIX/sbin/criu"
