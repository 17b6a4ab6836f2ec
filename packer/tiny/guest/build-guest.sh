#!/usr/bin/env bash
# Build the tiny test guest: OUTDIR/vmlinuz (Debian's cloud kernel) and OUTDIR/initrd.img
# (busybox + the guest agent + the kernel modules the cloud kernel lacks built in).
#
#   packer/tiny/guest/build-guest.sh OUTDIR
#
# The result is cached under $IMAGEPIPE_CACHE (default /var/cache/imagepipe/guest), keyed by
# the kernel package version and a hash of every file in this folder, so a second run only
# copies two files.
# Needs: apt-get (to download the kernel .deb), dpkg, busybox-static, gcc + libc6-dev, cpio, gzip.
set -euo pipefail

if [ "$#" -ne 1 ]; then
  echo "usage: $0 OUTDIR" >&2
  exit 2
fi
outdir=$1
here=$(cd "$(dirname "$0")" && pwd)
cache=${IMAGEPIPE_CACHE:-/var/cache/imagepipe/guest}
meta=linux-image-cloud-amd64
modules=(virtio_blk virtio_console)   # everything else the guest needs is built in

die() { echo "build-guest: $*" >&2; exit "${2:-3}"; }
for tool in apt-cache apt-get dpkg gcc cpio gzip flock sha256sum; do
  command -v "$tool" >/dev/null || die "$tool is missing (run ./install.sh or scripts/setup-host.sh)"
done
[ -x /bin/busybox ] || die "/bin/busybox is missing (apt-get install busybox-static)"

mkdir -p "$cache" "$outdir" || die "cannot create $cache or $outdir (run as root or set IMAGEPIPE_CACHE)"
exec 9>"$cache/.lock"
flock 9

# The kernel package the meta-package points at now, e.g. linux-image-6.1.0-56-cloud-amd64.
resolve_kernel() {
  apt-cache depends "$meta" 2>/dev/null | awk '/Depends: linux-image-/ {print $2; exit}'
}
# apt-cache takes ~0.5 s per call: remember the answer until the package lists change.
resolved="$cache/resolved-kernel"
if [ -f "$resolved" ] && [ "$resolved" -nt /var/lib/apt/lists ]; then
  read -r kpkg kver <"$resolved"
else
  kpkg=$(resolve_kernel || true)
  if [ -z "$kpkg" ]; then
    apt-get update -qq >/dev/null 2>&1 || true
    kpkg=$(resolve_kernel || true)
  fi
  [ -n "$kpkg" ] || die "cannot resolve the $meta package (check /etc/apt/sources.list)"
  kver=$(apt-cache policy "$kpkg" 2>/dev/null | awk '/Candidate:/ {print $2; exit}')
  echo "$kpkg $kver" >"$resolved"
fi
# Every file of this folder (names and contents) and busybox: a changed, added or removed guest
# file is a new build, never a stale cached one.
srchash=$(cd "$here" && for f in *; do
  [ -f "$f" ] && printf '%s\n' "$f" && cat "$f"
done | cat - /bin/busybox | sha256sum | cut -c1-16)
key="$kpkg-$kver-$srchash"
built="$cache/$key"

if [ ! -f "$built/initrd.img" ]; then
  work=$(mktemp -d "$cache/work.XXXXXX")
  trap 'rm -rf "$work"' EXIT
  debdir="$cache/debs"
  mkdir -p "$debdir"
  deb=$(ls "$debdir/${kpkg}_"*.deb 2>/dev/null | head -1 || true)
  if [ -z "$deb" ]; then
    echo "build-guest: downloading $kpkg $kver" >&2
    if ! (cd "$work" && apt-get download "$kpkg" >/dev/null 2>&1); then
      apt-get update -qq >/dev/null 2>&1 || true
      (cd "$work" && apt-get download "$kpkg" >/dev/null 2>&1) \
        || die "apt-get download $kpkg failed (no network to the Debian mirror?)"
    fi
    mv "$work"/"${kpkg}"_*.deb "$debdir/"
    deb=$(ls "$debdir/${kpkg}_"*.deb | head -1)
  fi
  dpkg -x "$deb" "$work/kernel"
  release=${kpkg#linux-image-}
  moddir="$work/kernel/lib/modules/$release"
  [ -d "$moddir" ] || die "no modules for $release in $deb"

  root="$work/root"
  mkdir -p "$root"/{bin,sbin,etc,proc,sys,dev,run,tmp,home,mnt,root,lib/modules}
  cp /bin/busybox "$root/bin/busybox"
  for applet in $(/bin/busybox --list); do
    [ "$applet" = busybox ] || ln -sf busybox "$root/bin/$applet"
  done

  # Kernel modules in dependency order (dependencies read from each module's .modinfo).
  declare -A seen=()
  order=()
  add_module() {
    local name=$1 file deps dep
    [ -n "${seen[$name]:-}" ] && return 0
    seen[$name]=1
    file=$(find "$moddir/kernel" -name "$name.ko" -print -quit)
    [ -n "$file" ] || die "kernel module $name.ko not found in $release"
    deps=$(tr '\0' '\n' <"$file" | grep -a '^depends=' | head -1 | cut -d= -f2)
    for dep in ${deps//,/ }; do add_module "$dep"; done
    cp "$file" "$root/lib/modules/$name.ko"
    order+=("$name")
  }
  for m in "${modules[@]}"; do add_module "$m"; done
  # virtio_pci drives the devices; load it after the bus and ring code.
  add_module virtio_pci
  printf '%s\n' "${order[@]}" >"$root/etc/modules"

  gcc -static -Os -Wall -Wextra -Werror -o "$root/bin/imagepipe-agent" "$here/agent.c" \
    || die "compiling the guest agent failed (apt-get install gcc libc6-dev)" 4
  install -m 0755 "$here/init" "$root/init"
  install -m 0755 "$here/login-loop" "$root/bin/login-loop"
  install -m 0644 "$here/session.sh" "$root/etc/session.sh"
  install -m 0644 "$here/inittab" "$root/etc/inittab"
  echo "root:x:0:0:root:/root:/bin/sh" >"$root/etc/passwd"
  echo "root:x:0:" >"$root/etc/group"

  mkdir -p "$work/out"
  cp "$work/kernel/boot/vmlinuz-$release" "$work/out/vmlinuz"
  (cd "$root" && find . | LC_ALL=C sort | cpio -o -H newc --quiet -R 0:0) | gzip -6 >"$work/out/initrd.img"
  rm -rf "$built"
  mv "$work/out" "$built"
  # Older builds of the guest are not needed any more.
  find "$cache" -mindepth 1 -maxdepth 1 -type d -name 'linux-image-*' ! -name "$key" -exec rm -rf {} +
fi

cp "$built/vmlinuz" "$outdir/vmlinuz"
cp "$built/initrd.img" "$outdir/initrd.img"
echo "build-guest: $outdir/vmlinuz $outdir/initrd.img ($kpkg)"
