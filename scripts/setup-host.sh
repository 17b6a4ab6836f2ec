#!/usr/bin/env bash
# Install and start what imagepipe drives on this host: Packer, QEMU, libvirt, HAProxy, git,
# and what the tiny test guest is built from. Idempotent: safe to run again.
# Debian 12, as root. Leaves an already running libvirtd alone.
set -euo pipefail

if [ "$(id -u)" -ne 0 ]; then
  echo "setup-host: run as root (it installs packages and starts libvirtd)" >&2
  exit 3
fi

packages=(
  packer qemu-system-x86 qemu-utils
  libvirt-daemon libvirt-daemon-driver-qemu libvirt-clients libvirt-dev pkg-config
  haproxy git busybox-static cpio e2fsprogs
  systemd passwd shellcheck tini
  novnc chromium chromium-driver  # the web entrance's page; the browser its test drives
)
missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ "${#missing[@]}" -gt 0 ]; then
  echo "setup-host: installing ${missing[*]}"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

# libvirt's QEMU driver wants these to exist even when it runs guests as root.
getent group kvm >/dev/null || groupadd -r kvm
getent group libvirt-qemu >/dev/null || groupadd -r libvirt-qemu
getent passwd libvirt-qemu >/dev/null || useradd -r -g libvirt-qemu -G kvm -s /usr/sbin/nologin libvirt-qemu
mkdir -p /var/log/libvirt/qemu /var/run/libvirt /var/lib/libvirt/images /etc/libvirt

# Run guests as root with no security driver: this host has no AppArmor profile for them
# and the disks live under imagepipe's own image store. Marked so we only touch our own file.
conf=/etc/libvirt/qemu.conf
marker="# imagepipe: managed"
if [ ! -f "$conf" ] || ! grep -q "$marker" "$conf"; then
  [ -f "$conf" ] && cp -n "$conf" "$conf.imagepipe-orig"
  cat > "$conf" <<CONF
$marker (original saved as qemu.conf.imagepipe-orig)
user = "root"
group = "root"
security_driver = "none"
dynamic_ownership = 0
remember_owner = 0
CONF
fi

"$(dirname "$0")/libvirtd.sh" start || true
virsh -c qemu:///system version >/dev/null 2>&1 || {
  echo "setup-host: libvirtd did not answer on qemu:///system" >&2
  exit 3
}
echo "setup-host: packer $(packer version | head -1), $(virsh -c qemu:///system version --daemon | grep -i 'running hypervisor' || true), $(haproxy -v | head -1 | cut -d' ' -f1-3)"
