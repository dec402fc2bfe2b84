#!/usr/bin/env bash
# Install what the demo and the tests need on Debian/Ubuntu, only when missing (idempotent, quiet when
# everything is there). Needs root for apt-get.
set -euo pipefail

need=()
have() { command -v "$1" >/dev/null 2>&1 || [ -x "/usr/sbin/$1" ] || [ -x "/sbin/$1" ]; }
have ip || need+=(iproute2)
have qemu-system-x86_64 || need+=(qemu-system-x86)
have qemu-img || need+=(qemu-utils)
[ -e /usr/lib/ipxe/qemu/efi-virtio.rom ] || [ -e /usr/share/qemu/efi-virtio.rom ] || need+=(ipxe-qemu)
[ -e /usr/lib/ipxe/ipxe.lkrn ] || need+=(ipxe)
have dnsmasq || need+=(dnsmasq-base)
have nix-instantiate || need+=(nix-bin)
# The unit tests' real systemd (PID 1 of private namespaces, tests/systemd_module_unit.rs, tests/systemd_readme_unit.rs), systemd-analyze and
# systemd-networkd (scripts/nix-checks.sh); nsenter/unshare/setsid come with util-linux.
[ -x /lib/systemd/systemd ] && have systemd-analyze && [ -x /lib/systemd/systemd-networkd ] || need+=(systemd)
have nsenter || need+=(util-linux)
# The real Linux test guest (scripts/build-test-guest.sh): Debian packages unpacked into a cpio initramfs.
have cpio || need+=(cpio)
have dpkg-deb || need+=(dpkg)
# The probe tests' port-security stand-in (an nftables netdev ingress rule in the LAN namespace).
have nft || need+=(nftables)
# The boot cache's HTTPS origin (tests/common/origin.rs): a private CA made by openssl, served by python3's ssl;
# its 50 Mbit/s link is shaped by tc (iproute2).
have openssl || need+=(openssl)
have python3 || need+=(python3)
have tc || need+=(iproute2)
# The boot cache's HTTP/2 origin (tests/bootcache.rs): nghttpd, an HTTP/2-only TLS file server.
have nghttpd || need+=(nghttp2-server)

if [ ${#need[@]} -gt 0 ]; then
	echo "install-deps: installing ${need[*]}"
	if [ "$(id -u)" -ne 0 ]; then
		echo "install-deps: need root to apt-get install ${need[*]}" >&2
		exit 1
	fi
	export DEBIAN_FRONTEND=noninteractive
	apt_get() { apt-get -o DPkg::Lock::Timeout=600 -q "$@"; }
	apt_get install -y --no-install-recommends "${need[@]}" >/dev/null ||
		{ apt_get update >/dev/null && apt_get install -y --no-install-recommends "${need[@]}" >/dev/null; }
fi
