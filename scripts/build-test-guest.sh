#!/usr/bin/env bash
# Build the real Linux test guest of the end-to-end tests (tests/real_guest.rs) from Debian packages, and
# print the directory holding it: vmlinuz, initrd.img and versions.
#
# The guest honours the publisher contract of nix/modules/ec-publisher-guest.nix: NICs named by PCI slot
# (00:03.0 -> boot0, 00:04.0 -> lan0), DHCP on both, the module's own discovery and ready scripts
# (nix/guest/*.sh, run verbatim with Debian's bash, busybox and hdhomerun_config), and a power-off on the ACPI
# power button, and the system credentials the launcher passes through QEMU's fw_cfg (qemu_fw_cfg, copied into
# /run/credentials/@system as systemd does, each named on the console with its SHA-256). Kernel command line
# extras it understands: `ec_line80` prints a line of exactly 80 columns just before the ready script runs;
# `ec_credentials=NAME,NAME` lists the credentials the publisher expects (the module's
# every-channel.publisherGuest.credentials).
#
# Packages come from apt (`apt-get download`, cached in DIR/debs) and are unpacked with `dpkg-deb -x`: nothing
# is installed on the host. The result is cached in DIR/<key>, keyed by the package versions and the inputs
# (this script, the guest scripts), built in a temporary directory and renamed into place, under a lock, so
# concurrent callers build it once. DIR is $EC_TEST_GUEST_DIR or target/test-guest.
set -euo pipefail

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
base=${EC_TEST_GUEST_DIR:-$repo/target/test-guest}
say() { printf 'build-test-guest: %s\n' "$*" >&2; }
die() {
	printf 'build-test-guest: %s\n' "$*" >&2
	exit 1
}

for tool in apt-get apt-cache dpkg-deb cpio gzip sha256sum flock; do
	command -v "$tool" >/dev/null 2>&1 || die "needs $tool (scripts/install-deps.sh installs it)"
done
mkdir -p "$base/debs"

# Which packages: the cloud kernel the meta-package currently points at, busybox, bash (the module's scripts
# are bash scripts) and Debian's hdhomerun_config with the C library they link against.
kernel_pkg() {
	apt-cache depends linux-image-cloud-amd64 2>/dev/null | awk '$1 == "Depends:" && $2 ~ /^linux-image-/ { print $2; exit }'
}
kpkg=$(kernel_pkg)
if [ -z "$kpkg" ]; then
	say "apt knows no linux-image-cloud-amd64: apt-get update"
	apt-get -o DPkg::Lock::Timeout=600 -q update >/dev/null || die "apt-get update failed"
	kpkg=$(kernel_pkg)
	[ -n "$kpkg" ] || die "apt offers no linux-image-cloud-amd64 (is this Debian amd64 with main enabled?)"
fi
pkgs=("$kpkg" busybox-static bash libtinfo6 libc6 hdhomerun-config)

candidate() { apt-cache policy "$1" | awk '$1 == "Candidate:" { print $2; exit }'; }
versions=""
for p in "${pkgs[@]}"; do
	v=$(candidate "$p")
	{ [ -n "$v" ] && [ "$v" != "(none)" ]; } || die "apt has no candidate version of $p"
	versions+="$p=$v"$'\n'
done

key=$({
	printf '%s' "$versions"
	cat "${BASH_SOURCE[0]}" "$repo/nix/guest/ec-publisher-discover.sh" "$repo/nix/guest/ec-publisher-ready.sh"
} | sha256sum | cut -c1-16)
out="$base/$key"
if [ -s "$out/vmlinuz" ] && [ -s "$out/initrd.img" ]; then
	echo "$out"
	exit 0
fi

exec 9>"$base/.lock"
flock 9
if [ -s "$out/vmlinuz" ] && [ -s "$out/initrd.img" ]; then
	echo "$out"
	exit 0
fi

tmp=$(mktemp -d "$base/.build.XXXXXX")
trap 'rm -rf "$tmp"' EXIT

# Download what the cache does not have yet (apt names the file pkg_version_arch.deb, ':' as %3a).
debs=()
while IFS='=' read -r p v; do
	[ -n "$p" ] || continue
	pattern="$base/debs/${p}_${v//:/%3a}_"
	deb=$(compgen -G "${pattern}*.deb" | head -n1 || true)
	if [ -z "$deb" ]; then
		say "apt-get download $p=$v"
		# apt's _apt sandbox user may not write here; as root apt falls back to downloading unsandboxed.
		(cd "$tmp" && apt-get -q -o APT::Sandbox::User=root download "$p=$v" >/dev/null) ||
			die "apt-get download $p=$v failed"
		mv "$tmp"/*.deb "$base/debs/"
		deb=$(compgen -G "${pattern}*.deb" | head -n1 || true)
		[ -n "$deb" ] || die "apt-get download $p=$v gave no ${pattern}*.deb"
	fi
	debs+=("$deb")
done <<<"$versions"

# Unpack everything into one tree; nothing is installed.
x="$tmp/x"
mkdir "$x"
for deb in "${debs[@]}"; do
	dpkg-deb -x "$deb" "$x"
done
kver=$(ls "$x/lib/modules")
[ -f "$x/boot/vmlinuz-$kver" ] || die "no vmlinuz-$kver in $kpkg"
bb="$x/bin/busybox"

# The modules the guest loads, with their dependencies. The package carries no modules.dep (the package's
# postinst runs depmod), so busybox's depmod writes one for the unpacked tree first.
"$bb" depmod -b "$x" "$kver"
wanted=(virtio_pci virtio_net button evdev qemu_fw_cfg)
closure() {
	local dep="$x/lib/modules/$kver/modules.dep" m line
	for m in "$@"; do
		line=$(grep -E "(^|/)$m\.ko(\.[a-z]+)?:" "$dep") || die "$kpkg has no module $m"
		printf '%s\n' "${line%%:*}"
		for d in ${line#*:}; do printf '%s\n' "$d"; done
	done | sort -u
}

r="$tmp/root"
mkdir -p "$r"/{bin,sbin,usr/bin,usr/sbin,lib,lib64,etc/ec-publisher,proc,sys,dev,run,tmp,var,root}
ln -s ../run "$r/var/run"
cp "$bb" "$r/bin/busybox"
for applet in $("$bb" --list); do
	[ "$applet" = busybox ] || [ -e "$r/bin/$applet" ] || ln -s busybox "$r/bin/$applet"
done
cp "$x/bin/bash" "$r/bin/bash"
cp -a "$x/lib/x86_64-linux-gnu" "$r/lib/"
cp -a "$x/lib64/." "$r/lib64/"
cp "$x/usr/bin/hdhomerun_config" "$r/usr/bin/"
while read -r rel; do
	mkdir -p "$r/lib/modules/$kver/$(dirname "$rel")"
	cp "$x/lib/modules/$kver/$rel" "$r/lib/modules/$kver/$rel"
done < <(closure "${wanted[@]}")
"$bb" depmod -b "$r" "$kver"
cp "$repo/nix/guest/ec-publisher-discover.sh" "$repo/nix/guest/ec-publisher-ready.sh" "$r/etc/ec-publisher/"
printf '%s' "$versions" >"$r/etc/ec-publisher/versions"

cat >"$r/etc/udhcpc.script" <<'EOF'
#!/bin/sh
# udhcpc's hook: the leased address on the interface, a default route on the boot NIC only (the LAN is for
# tuners, as in the NixOS module's route metrics).
case "$1" in
deconfig)
	ip -4 addr flush dev "$interface"
	ip link set "$interface" up
	;;
bound | renew)
	ip -4 addr flush dev "$interface"
	ip addr add "$ip/${mask:-24}" dev "$interface"
	if [ "$interface" = boot0 ]; then
		for r in $router; do
			ip route replace default via "$r" dev "$interface" metric 100
			break
		done
	fi
	;;
esac
exit 0
EOF
chmod 755 "$r/etc/udhcpc.script"

cat >"$r/init" <<'EOF'
#!/bin/sh
# PID 1 of the ec-ipxe-qemu test guest (scripts/build-test-guest.sh): the publisher contract of
# nix/modules/ec-publisher-guest.nix with Debian's busybox, bash and hdhomerun_config.
export PATH=/bin:/sbin:/usr/bin:/usr/sbin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
exec </dev/console >/dev/console 2>&1
echo "ec-guest: init started ($(uname -r))"
modprobe -a virtio_pci virtio_net button evdev || echo "ec-guest: modprobe failed"

# System credentials from QEMU's fw_cfg (the launcher's --credential), copied into /run/credentials/@system
# as systemd's PID 1 does (import-creds.c), which is what $CREDENTIALS_DIRECTORY holds for the module's units.
# Each is named on the console with the SHA-256 and size of its value (never the value), for the tests.
modprobe qemu_fw_cfg || echo "ec-guest: modprobe qemu_fw_cfg failed"
creds=/run/credentials/@system
mkdir -p "$creds"
chmod 700 "$creds"
fwcreds=/sys/firmware/qemu_fw_cfg/by_name/opt/io.systemd.credentials
if [ -d "$fwcreds" ]; then
	for d in "$fwcreds"/*; do
		[ -e "$d/raw" ] || continue
		n=${d##*/}
		cp "$d/raw" "$creds/$n"
		chmod 400 "$creds/$n"
		sum=$(sha256sum <"$creds/$n")
		echo "ec-guest: credential $n sha256 ${sum%% *} size $(wc -c <"$creds/$n")"
	done
else
	echo "ec-guest: no credentials in fw_cfg"
fi
export CREDENTIALS_DIRECTORY=$creds
# The credential names the publisher expects: `ec_credentials=NAME,NAME` on the kernel command line (the
# NixOS module's every-channel.publisherGuest.credentials).
EC_CREDENTIALS=""
for arg in $(cat /proc/cmdline); do
	case "$arg" in ec_credentials=*) EC_CREDENTIALS=$(echo "${arg#ec_credentials=}" | tr , '\n') ;; esac
done
export EC_CREDENTIALS

# NICs named by PCI slot, as the module's .link files do.
# The PCI address above the NIC (a virtio NIC's parent is the virtio device, whose parent is the PCI one).
slot_of() {
	d=$(readlink -f "/sys/class/net/$1/device")
	case "${d##*/}" in virtio*) d=${d%/*} ;; esac
	echo "${d##*/}"
}
for _ in $(seq 1 100); do
	for dev in /sys/class/net/*; do
		n=${dev##*/}
		case "$(slot_of "$n")" in
		0000:00:03.0) [ "$n" = boot0 ] || ip link set "$n" name boot0 ;;
		0000:00:04.0) [ "$n" = lan0 ] || ip link set "$n" name lan0 ;;
		esac
	done
	[ -e /sys/class/net/boot0 ] && break
	sleep 0.1
done
ip link set lo up
for n in boot0 lan0; do
	[ -e "/sys/class/net/$n" ] || continue
	echo "ec-guest: $n is $(slot_of "$n") $(cat "/sys/class/net/$n/address")"
	ip link set "$n" up
	udhcpc -f -S -i "$n" -s /etc/udhcpc.script -t 30 -T 1 -x "hostname:ec-test-guest" >/dev/null 2>&1 &
done

# The ACPI power button: the input device "Power Button" (driver button), read with dd until it reports.
powerbutton=""
for _ in $(seq 1 50); do
	for e in /sys/class/input/event*; do
		[ "$(cat "$e/device/name" 2>/dev/null)" = "Power Button" ] && powerbutton=/dev/input/${e##*/}
	done
	[ -n "$powerbutton" ] && break
	sleep 0.1
done
if [ -n "$powerbutton" ]; then
	(
		if ! dd if="$powerbutton" of=/dev/null bs=24 count=1 2>/dev/null; then
			echo "ec-guest: cannot read the power button $powerbutton"
			exit 1
		fi
		echo "ec-guest: power button: powering off"
		sync
		poweroff -f
	) &
else
	echo "ec-guest: no ACPI power button found"
fi

PATH=/bin:/usr/bin EC_TUNER_ATTEMPTS=12 bash /etc/ec-publisher/ec-publisher-discover.sh
if grep -qw ec_line80 /proc/cmdline; then
	# 80 columns exactly: "ec-guest: " and 70 digits.
	echo "ec-guest: $(printf '%070d' 0)"
fi
PATH=/bin:/usr/bin bash /etc/ec-publisher/ec-publisher-ready.sh
while :; do sleep 3600; done
EOF
chmod 755 "$r/init"

(cd "$r" && find . -mindepth 1 | LC_ALL=C sort | cpio -o -H newc -R 0:0 --quiet | gzip -6) >"$tmp/initrd.img"
mkdir "$tmp/out"
cp "$x/boot/vmlinuz-$kver" "$tmp/out/vmlinuz"
mv "$tmp/initrd.img" "$tmp/out/initrd.img"
printf '%s' "$versions" >"$tmp/out/versions"
rm -rf "$out"
mv "$tmp/out" "$out"
# Older builds (other package versions or inputs) go.
for old in "$base"/*; do
	[ "$old" = "$out" ] || [ "$old" = "$base/debs" ] || rm -rf "$old"
done
say "built $out (kernel $kver, initrd $(du -h "$out/initrd.img" | cut -f1))"
echo "$out"
