#!/usr/bin/env bash
# Install and start what imagepipe drives on this host: Packer, QEMU, libvirt, HAProxy, git,
# what install.sh builds the venv with and what the tiny test guest is built from; `--dev`
# adds the test tools. Idempotent: safe to run again.
# Debian 12, as root. Leaves an already running libvirtd alone.
set -euo pipefail

dev=no
case "${1:-}" in
  "") ;;
  --dev) dev=yes ;;
  *) echo "setup-host: unknown option $1 (--dev: the test tools too)" >&2; exit 2 ;;
esac

if [ "$(id -u)" -ne 0 ]; then
  echo "setup-host: run as root (it installs packages and starts libvirtd)" >&2
  exit 3
fi

# Every package imagepipe, its scripts and its build need on a fresh Debian 12, beyond what
# `debootstrap --variant=minbase` has (the Essential and required packages). One per line,
# grouped by what needs it; tests/integration/test_fresh_host.py resolves the list on a
# minimal Debian 12 root and checks every program the scripts call against it.
packages=(
  # image builds: Packer with its QEMU builder
  packer
  qemu-system-x86
  qemu-utils
  # hypervisor: libvirt's daemon and QEMU driver, virsh and virt-admin
  libvirt-daemon
  libvirt-daemon-driver-qemu
  libvirt-clients
  tini          # scripts/libvirtd.sh supervises libvirtd with it
  procps        # pgrep / pkill in scripts/libvirtd.sh
  # balancer and registry
  haproxy
  git
  novnc         # the web entrance's page (imagepipe web serves /usr/share/novnc)
  # install.sh: the venv, and libvirt-python compiled by pip against libvirt's headers
  python3
  python3-venv
  python3-dev
  gcc
  libc6-dev
  libvirt-dev
  pkg-config
  ca-certificates   # pip downloads over HTTPS
  # the tiny test guest and the IPVS director (packer/*/build-*.sh): busybox, a static agent
  busybox-static
  cpio
  e2fsprogs     # mkfs.ext2 for test disks
  # the keeper as a service (install.sh --service) and the tests' network namespaces
  systemd
  passwd
  iproute2
  keepalived    # examples/keepalived: the balancer pair's VRRP address (and its failover test)
  util-linux    # unshare: each test libvirt host of tests/multihost has its own mounts
)
# ./install.sh --dev: what the tests and the checks run besides the Python tools.
dev_packages=(
  shellcheck    # actionlint checks the workflows' run: scripts with it
  debootstrap   # tests/integration/test_fresh_host.py: a minimal Debian 12 root
  chromium          # tests/e2e/test_web_e2e.py: a real browser on the web entrance
  chromium-driver   # selenium drives it
  postgresql        # tests/postgres.py: a real server for the PostgreSQL state store's tests
  nftables          # tests/multihost: the display-port firewall rule of docs/hosts.md
  openssh-client    # tests/multihost: libvirt's qemu+ssh:// transport runs ssh (and ssh-keygen)
  dropbear-bin      # tests/multihost: an SSH server in a lab host's namespaces, no system service
)
if [ "$dev" = yes ]; then
  packages+=("${dev_packages[@]}")
fi
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
