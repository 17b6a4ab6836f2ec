#!/usr/bin/env bash
# Build the IPVS director test machine: OUTDIR/vmlinuz (Debian's cloud kernel, which ships
# ip_vs*.ko) and OUTDIR/initrd.img (busybox with its ip and sysctl, ipvsadm, the shared libraries it
# need, the ip_vs modules and their dependencies, and a command agent on the second serial port).
#
#   packer/ipvs-director/build-director.sh OUTDIR
#
# Everything comes from Debian packages (apt-get download + dpkg -x). The result is cached under
# $IMAGEPIPE_CACHE (default /var/cache/imagepipe/director), keyed by the package versions and a
# hash of this folder, so a second run only copies two files.
# Needs: apt-get, dpkg, busybox-static, cpio, gzip.
set -euo pipefail

if [ "$#" -ne 1 ]; then
  echo "usage: $0 OUTDIR" >&2
  exit 2
fi
outdir=$1
here=$(cd "$(dirname "$0")" && pwd)
cache=${IMAGEPIPE_CACHE:-/var/cache/imagepipe/director}
meta=linux-image-cloud-amd64
programs=(ipvsadm)                     # packages whose programs go into the initramfs
binaries=(/sbin/ipvsadm)               # the programs themselves (busybox has ip and sysctl)
# ip_vs and its schedulers; their dependencies (nf_conntrack, libcrc32c, ...) follow from
# each module's modinfo. virtio_net drives the two user-mode network cards.
modules=(virtio_net virtio_pci ip_vs ip_vs_rr ip_vs_wrr ip_vs_lc ip_vs_wlc ip_vs_sed ip_vs_nq ip_vs_sh)

die() { echo "build-director: $*" >&2; exit "${2:-3}"; }
for tool in apt-cache apt-get dpkg cpio gzip flock sha256sum; do
  command -v "$tool" >/dev/null || die "$tool is missing (run scripts/setup-host.sh)"
done
[ -x /bin/busybox ] || die "/bin/busybox is missing (apt-get install busybox-static)"

mkdir -p "$cache" "$outdir" || die "cannot create $cache or $outdir (run as root or set IMAGEPIPE_CACHE)"
exec 9>"$cache/.lock"
flock 9

candidate() { apt-cache policy "$1" 2>/dev/null | awk '/Candidate:/ {print $2; exit}'; }
# The library packages the programs need, from apt's dependency graph (only lib*: the
# programs' maintainer-script dependencies do not belong in an initramfs).
libraries() {
  apt-cache depends --recurse --no-recommends --no-suggests --no-conflicts --no-breaks \
    --no-replaces --no-enhances --no-pre-depends "${programs[@]}" 2>/dev/null \
    | grep -v '^ ' | grep -v '<' | grep -E '^(lib|zlib)' | sort -u
}
resolved="$cache/resolved"
if [ -f "$resolved" ] && [ "$resolved" -nt /var/lib/apt/lists ]; then
  mapfile -t pkgs <"$resolved"
else
  kpkg=$(apt-cache depends "$meta" 2>/dev/null | awk '/Depends: linux-image-/ {print $2; exit}')
  if [ -z "$kpkg" ]; then
    apt-get update -qq >/dev/null 2>&1 || true
    kpkg=$(apt-cache depends "$meta" 2>/dev/null | awk '/Depends: linux-image-/ {print $2; exit}')
  fi
  [ -n "$kpkg" ] || die "cannot resolve the $meta package (check /etc/apt/sources.list)"
  pkgs=()
  for p in "$kpkg" "${programs[@]}" $(libraries); do
    v=$(candidate "$p")
    [ -n "$v" ] || die "no candidate version for $p (apt-get update?)"
    pkgs+=("$p=$v")
  done
  printf '%s\n' "${pkgs[@]}" >"$resolved"
fi
kpkg=${pkgs[0]%%=*}
srchash=$(cat "$here"/build-director.sh "$here"/init "$here"/agent.sh /bin/busybox \
  | sha256sum | cut -c1-16)
key="$(printf '%s\n' "${pkgs[@]}" | sha256sum | cut -c1-16)-$srchash"
built="$cache/build-$key"

if [ ! -f "$built/initrd.img" ]; then
  work=$(mktemp -d "$cache/work.XXXXXX")
  trap 'rm -rf "$work"' EXIT
  debdir="$cache/debs"
  mkdir -p "$debdir" "$work/staging"
  for spec in "${pkgs[@]}"; do
    p=${spec%%=*} v=${spec#*=}
    deb=$(ls "$debdir/${p}_${v//:/%3a}_"*.deb 2>/dev/null | head -1 || true)
    if [ -z "$deb" ]; then
      echo "build-director: downloading $p $v" >&2
      if ! (cd "$debdir" && apt-get download "$p=$v" >/dev/null 2>&1); then
        apt-get update -qq >/dev/null 2>&1 || true
        (cd "$debdir" && apt-get download "$p=$v" >/dev/null 2>&1) \
          || die "apt-get download $p=$v failed (no network to the Debian mirror?)"
      fi
      deb=$(ls "$debdir/${p}_${v//:/%3a}_"*.deb | head -1)
    fi
    if [ "$p" = "$kpkg" ]; then
      dpkg -x "$deb" "$work/kernel"
    else
      dpkg -x "$deb" "$work/staging"
    fi
  done
  release=${kpkg#linux-image-}
  moddir="$work/kernel/lib/modules/$release"
  [ -d "$moddir" ] || die "no modules for $release in $kpkg"

  root="$work/root"
  mkdir -p "$root"/{bin,sbin,etc,proc,sys,dev,run,tmp,root,lib/modules,lib64}
  cp /bin/busybox "$root/bin/busybox"
  for applet in $(/bin/busybox --list); do
    [ "$applet" = busybox ] || ln -sf busybox "$root/bin/$applet"
  done

  # The programs and, transitively, the shared libraries they load, resolved by the staged
  # dynamic loader against the staged libraries only (never this host's).
  stage=$work/staging
  [ -e "$stage/lib64/ld-linux-x86-64.so.2" ] || die "libc6 did not provide the dynamic loader"
  libpath="$stage/lib/x86_64-linux-gnu:$stage/usr/lib/x86_64-linux-gnu"
  loader=$(readlink -f "$stage/lib64/ld-linux-x86-64.so.2")
  for bin in "${binaries[@]}"; do
    [ -f "$stage$bin" ] || die "$bin is not in ${programs[*]}"
    rm -f "$root$bin"
    cp "$stage$bin" "$root$bin"
    deps=$("$loader" --library-path "$libpath" --list "$stage$bin") \
      || die "cannot resolve the libraries of $bin"
    if grep -q 'not found' <<<"$deps"; then
      die "libraries of $bin missing from the staged packages: $(grep 'not found' <<<"$deps" | tr -s ' \t\n' ' ')"
    fi
    for lib in $(awk '/=>/ {print $3}' <<<"$deps"); do
      cp -L "$lib" "$root/lib/$(basename "$lib")"
    done
  done
  cp -L "$stage/lib64/ld-linux-x86-64.so.2" "$root/lib64/ld-linux-x86-64.so.2"
  echo "/lib" >"$root/etc/ld.so.conf"

  # Kernel modules in dependency order (dependencies read from each module's .modinfo);
  # a module the kernel has built in is skipped.
  declare -A seen=()
  order=()
  add_module() {
    local name=$1 file deps dep
    [ -n "${seen[$name]:-}" ] && return 0
    seen[$name]=1
    if grep -q "/$name.ko\$" "$moddir/modules.builtin" 2>/dev/null; then return 0; fi
    file=$(find "$moddir/kernel" -name "$name.ko" -print -quit)
    [ -n "$file" ] || die "kernel module $name.ko not found in $release"
    deps=$(tr '\0' '\n' <"$file" | grep -a '^depends=' | head -1 | cut -d= -f2)
    for dep in ${deps//,/ }; do add_module "$dep"; done
    cp "$file" "$root/lib/modules/$name.ko"
    order+=("$name")
  }
  for m in "${modules[@]}"; do add_module "$m"; done
  printf '%s\n' "${order[@]}" >"$root/etc/modules"

  install -m 0755 "$here/init" "$root/init"
  install -m 0755 "$here/agent.sh" "$root/bin/imagepipe-director-agent"
  echo "root:x:0:0:root:/root:/bin/sh" >"$root/etc/passwd"
  echo "root:x:0:" >"$root/etc/group"
  echo "tcp 6" >"$root/etc/protocols"

  mkdir -p "$work/out"
  cp "$work/kernel/boot/vmlinuz-$release" "$work/out/vmlinuz"
  (cd "$root" && find . | LC_ALL=C sort | cpio -o -H newc --quiet -R 0:0) | gzip -6 >"$work/out/initrd.img"
  rm -rf "$built"
  mv "$work/out" "$built"
  # Older builds, and packages this build did not use, are not needed any more.
  find "$cache" -mindepth 1 -maxdepth 1 -type d -name 'build-*' ! -name "build-$key" -exec rm -rf {} +
  for deb in "$debdir"/*.deb; do
    used=
    for spec in "${pkgs[@]}"; do
      p=${spec%%=*} v=${spec#*=}
      case "$(basename "$deb")" in "${p}_${v//:/%3a}_"*) used=1 ;; esac
    done
    [ -n "$used" ] || rm -f "$deb"
  done
fi

cp "$built/vmlinuz" "$outdir/vmlinuz"
cp "$built/initrd.img" "$outdir/initrd.img"
echo "build-director: $outdir/vmlinuz $outdir/initrd.img ($kpkg)"
