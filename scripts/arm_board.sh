#!/usr/bin/env bash
# Prepare the emulated ARM64 board used by `edgec device emulate arm64` and the `arm` tests.
#
#   1. installs the Debian packages it needs (qemu-user-static binfmt-support debootstrap
#      gcc-aarch64-linux-gnu libc6-dev-arm64-cross debian-archive-keyring zstd) when missing;
#   2. mounts binfmt_misc and enables qemu-aarch64 (so a chroot can run arm64 binaries);
#   3. builds, once, an arm64 Debian bookworm userland (debootstrap, minbase + python3 3.11) with
#      the aarch64 TVM runtime (apache-tvm[rpc]), onnxruntime and numpy in /opt/tvmpy, and caches
#      it as a zstd tarball: $EDGEC_CACHE/arm64/rootfs.tar.zst (default ~/.cache/edgec).
#
# Idempotent: a second run only checks. Needs root (apt-get, mount, debootstrap, chroot).
# Environment: EDGEC_CACHE (cache dir), EDGEC_DEBIAN_MIRROR (default: this machine's apt
# mirror), PYTHON (host python whose pip downloads the aarch64 wheels; default .venv/bin/python),
# EDGEC_ARM_FORCE=1 (rebuild the tarball).
set -euo pipefail
cd "$(dirname "$0")/.."

# Keep these in sync with edgec/emulate.py (ROOTFS_VERSION is written to the tarball's stamp).
ROOTFS_VERSION=1
SUITE=bookworm
PACKAGES="qemu-user-static binfmt-support debootstrap gcc-aarch64-linux-gnu libc6-dev-arm64-cross debian-archive-keyring zstd"
WHEELS="apache-tvm[rpc]==0.27.0.post1 apache-tvm-ffi==0.1.14.post1 onnxruntime==1.32.0 numpy>=2,<3"

CACHE=${EDGEC_CACHE:-$HOME/.cache/edgec}/arm64
TARBALL=$CACHE/rootfs.tar.zst
STAMP=$CACHE/rootfs.stamp
PY=${PYTHON:-.venv/bin/python}
[ -x "$PY" ] || PY=python3

say() { echo "arm_board: $*" >&2; }
die() { echo "arm_board: error: $*" >&2; exit 1; }

[ "$(id -u)" = 0 ] || die "needs root (apt-get, mount, debootstrap, chroot); run: sudo bash $0"

# 1. Debian packages.
missing=""
for p in $PACKAGES; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing="$missing $p"
done
if [ -n "$missing" ]; then
  say "installing Debian packages:$missing"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  # shellcheck disable=SC2086
  apt-get install -y -qq --no-install-recommends $missing >/dev/null
fi

# 2. binfmt_misc + qemu-aarch64.
if [ ! -e /proc/sys/fs/binfmt_misc/status ]; then
  mount -t binfmt_misc binfmt_misc /proc/sys/fs/binfmt_misc 2>/dev/null ||
    die "cannot mount binfmt_misc (in a container, run it with --privileged or mount it on the host)"
fi
if ! grep -q enabled /proc/sys/fs/binfmt_misc/qemu-aarch64 2>/dev/null; then
  update-binfmts --enable qemu-aarch64 >/dev/null 2>&1 || update-binfmts --import qemu-aarch64 >/dev/null 2>&1 || true
fi
grep -q enabled /proc/sys/fs/binfmt_misc/qemu-aarch64 2>/dev/null ||
  die "qemu-aarch64 is not registered with binfmt_misc (update-binfmts --enable qemu-aarch64 failed)"

# 3. The cached rootfs tarball.
want="version=$ROOTFS_VERSION suite=$SUITE wheels=$WHEELS"
if [ -z "${EDGEC_ARM_FORCE:-}" ] && [ -f "$TARBALL" ] && [ "$(cat "$STAMP" 2>/dev/null)" = "$want" ]; then
  say "rootfs cached: $TARBALL"
  exit 0
fi

mirror=${EDGEC_DEBIAN_MIRROR:-}
if [ -z "$mirror" ]; then
  # This machine's Debian mirror (deb822 .sources or one-line .list), else deb.debian.org.
  mirror=$(grep -h -E '^URIs:' /etc/apt/sources.list.d/*.sources 2>/dev/null | awk '{print $2}' | grep -E '/debian/?$' | head -1 || true)
  [ -n "$mirror" ] || mirror=$(grep -h -E '^deb ' /etc/apt/sources.list /etc/apt/sources.list.d/*.list 2>/dev/null |
    awk '{for(i=2;i<=NF;i++) if ($i ~ /^https?:/) {print $i; exit}}' | grep -E '/debian/?$' | head -1 || true)
  [ -n "$mirror" ] || mirror=http://deb.debian.org/debian
fi

mkdir -p "$CACHE"
work=$(mktemp -d "$CACHE/build.XXXXXX")
pip_pid=""
cleanup() {
  [ -z "$pip_pid" ] || kill "$pip_pid" 2>/dev/null || true
  for m in proc dev; do umount "$work/root/$m" 2>/dev/null || true; done
  rm -rf "$work"
}
trap cleanup EXIT
root=$work/root

# The aarch64 wheels download (host pip, no emulation) while debootstrap runs.
say "downloading the aarch64 TVM runtime, onnxruntime and numpy (in the background)"
# shellcheck disable=SC2086
"$PY" -m pip install -q --disable-pip-version-check --target "$work/tvmpy" --only-binary=:all: \
  --platform manylinux_2_28_aarch64 --platform manylinux2014_aarch64 --python-version 3.11 --implementation cp \
  $WHEELS >"$work/pip.log" 2>&1 &
pip_pid=$!

say "building the arm64 $SUITE userland (debootstrap from $mirror, a few minutes: its second stage runs emulated)"
t0=$SECONDS
debootstrap --arch=arm64 --variant=minbase --include=python3 "$SUITE" "$root" "$mirror" >"$work/debootstrap.log" 2>&1 ||
  { tail -20 "$work/debootstrap.log" >&2; die "debootstrap failed (log above)"; }
say "debootstrap took $((SECONDS - t0)) s"

wait "$pip_pid" || { pip_pid="";  grep -v -E '^WARNING: Location' "$work/pip.log" | tail -20 >&2; die "pip could not install the aarch64 wheels (log above)"; }
[ -d "$work/tvmpy/tvm" ] && [ -d "$work/tvmpy/onnxruntime" ] || die "pip could not install the aarch64 wheels"
mkdir -p "$root/opt"
pip_pid=""
mv "$work/tvmpy" "$root/opt/tvmpy"

# Smaller tarball: drop apt lists/caches and docs.
rm -rf "$root"/var/cache/apt/archives/*.deb "$root"/var/lib/apt/lists/* "$root"/usr/share/doc/* "$root"/usr/share/man/*

say "checking the runtime inside the emulated userland"
chroot "$root" /usr/bin/env PYTHONPATH=/opt/tvmpy /usr/bin/python3 -c \
  'import platform, tvm, onnxruntime, numpy; assert platform.machine() == "aarch64", platform.machine(); print("ok", tvm.__version__, onnxruntime.__version__, numpy.__version__)' >&2 ||
  die "the emulated userland cannot import tvm/onnxruntime"

say "caching $TARBALL"
tar -C "$root" --numeric-owner -I 'zstd -q -T0 -3' -cf "$TARBALL.tmp" .
mv -f "$TARBALL.tmp" "$TARBALL"
echo "$want" >"$STAMP"
say "done ($(du -h "$TARBALL" | cut -f1))"
