#!/bin/bash
# A real systemd (Debian's 252) as PID 1 of private namespaces, as ../shared/systemd-lab.md
# describes; driven by tests/systemd_module_unit.rs, which makes the lab network, talks to this
# systemd with `nsenter -t PID1 -m -p -C -u -i -- systemctl ...` and tears everything down.
#
#   pid1.sh outer WORK NETNS DEV      run with setsid and a clean env: moves itself into fresh
#                                     child cgroups (their paths go to WORK/cgroups, one per line,
#                                     for the teardown), then execs unshare ... pid1.sh inner
#   pid1.sh inner WORK NETNS DEV      PID 1 of the new PID namespace: mounts, then execs systemd
#
# WORK holds: units/ (what SYSTEMD_UNIT_PATH lists), bin/ (copied to /run/ec-lab/bin), the
# passwd/group additions (passwd.add, group.add) and console.log (bound on /dev/console).
# NETNS is the lab's host-side network namespace (a name under /run/netns); inside, it is
# /run/netns/lab-host. DEV is `public` (the machine's devtmpfs, where the kernel makes
# /dev/tapN) or `container` (a tmpfs /dev with the basic nodes and no /dev/tapN, as in a
# container without udev).
set -euo pipefail

mode=$1 work=$2 netns=$3 dev=$4

fail() {
	echo "pid1.sh $mode: $*" >&2
	exit 1
}

outer() {
	local name line hier ctrls path base dir new lines
	name=$(basename "$work")
	: >"$work/cgroups"
	# Read it whole first: the file changes as this process moves.
	mapfile -t lines </proc/self/cgroup
	for line in "${lines[@]}"; do
		hier=${line%%:*}
		line=${line#*:}
		ctrls=${line%%:*}
		path=${line#*:}
		if [[ "$hier" == 0 && -z "$ctrls" ]]; then
			base=/sys/fs/cgroup/unified
		else
			base=/sys/fs/cgroup/${ctrls#name=}
		fi
		[[ -d "$base" ]] || fail "no cgroup hierarchy at $base for '$ctrls'"
		dir=${base}${path%/}
		new=$dir/$name
		mkdir "$new"
		echo "$new" >>"$work/cgroups"
		if [[ "$ctrls" == cpuset ]]; then
			cat "$dir/cpuset.cpus" >"$new/cpuset.cpus"
			cat "$dir/cpuset.mems" >"$new/cpuset.mems"
		fi
		echo $$ >"$new/cgroup.procs"
	done
	export LIBMOUNT_UTAB=$work/utab
	exec unshare --pid --fork --mount --uts --ipc --cgroup --propagation private --mount-proc \
		"$0" inner "$work" "$netns" "$dev"
}

# Recreate a device node of the machine's /dev (same type and numbers) under a new /dev.
copy_node() {
	local src=$1 dst=$2 mode=$3 hex
	[[ -c "$src" ]] || return 0
	hex=$(stat -c '%t %T' "$src")
	mkdir -p "$(dirname "$dst")"
	# shellcheck disable=SC2086
	mknod -m "$mode" "$dst" c $((0x${hex% *})) $((0x${hex#* }))
}

inner() {
	export LIBMOUNT_UTAB=$work/utab
	local cg hier opts

	# The lab netns file survives the new /run by a bind mount moved back in place.
	touch "$work/netns-file"
	mount --bind "/run/netns/$netns" "$work/netns-file"
	# /run exactly as systemd mounts it on real hosts: nosuid,nodev.
	mount -t tmpfs -o nosuid,nodev,mode=755 tmpfs /run
	mkdir -p /run/netns /run/ec-lab/bin
	touch /run/netns/lab-host
	mount --move "$work/netns-file" /run/netns/lab-host
	install -m 0755 "$work"/bin/* /run/ec-lab/bin/
	# A boot directory for --boot-dir (the real test guest), when the test gives one.
	if [[ -d "$work/www" ]]; then
		cp -r "$work/www" /run/ec-lab/www
		chmod -R a+rX /run/ec-lab/www
	fi
	mkdir -p /run/ec-lab/units /run/ec-lab/empty
	cp "$work"/units/* /run/ec-lab/units/

	# systemd 252 does not remount /sys for NetworkNamespacePath= units, and both binaries
	# read /sys/class/net: mount /sys from inside the lab netns.
	umount -R -l /sys
	nsenter --net=/run/netns/lab-host mount -t sysfs -o nosuid,nodev,noexec sysfs /sys
	# cgroups, rooted at the new cgroup namespace: every v1 controller, name=systemd, unified.
	mount -t tmpfs -o nosuid,nodev,noexec,mode=755 tmpfs /sys/fs/cgroup
	while IFS= read -r cg; do
		case "$cg" in
		/sys/fs/cgroup/unified/*)
			mkdir -p /sys/fs/cgroup/unified
			mount -t cgroup2 -o nosuid,nodev,noexec cgroup2 /sys/fs/cgroup/unified
			;;
		*)
			hier=${cg#/sys/fs/cgroup/}
			hier=${hier%%/*}
			if [[ "$hier" == systemd ]]; then opts=none,name=systemd; else opts=$hier; fi
			mkdir -p "/sys/fs/cgroup/$hier"
			mount -t cgroup -o "nosuid,nodev,noexec,$opts" cgroup "/sys/fs/cgroup/$hier"
			;;
		esac
	done <"$work/cgroups"

	mount -t tmpfs -o mode=755 tmpfs /var/lib
	mkdir -p /var/log/journal
	mount -t tmpfs -o mode=755 tmpfs /var/log/journal

	# The service user and group, added to copies of /etc/passwd and /etc/group.
	cat /etc/passwd "$work/passwd.add" >"$work/passwd"
	cat /etc/group "$work/group.add" >"$work/group"
	mount --bind "$work/passwd" /etc/passwd
	mount --bind "$work/group" /etc/group

	touch "$work/console.log"
	if [[ "$dev" == container ]]; then
		# A container-like /dev: basic nodes, tun, kvm, vhost-net, and no /dev/tapN (no udev,
		# and devtmpfs is not mounted), so ec-macvtap must make a private node.
		mkdir -p "$work/dev"
		mount -t tmpfs -o nosuid,mode=755 tmpfs "$work/dev"
		for n in null zero full random urandom tty; do copy_node "/dev/$n" "$work/dev/$n" 666; done
		copy_node /dev/net/tun "$work/dev/net/tun" 666
		copy_node /dev/kvm "$work/dev/kvm" 660
		copy_node /dev/vhost-net "$work/dev/vhost-net" 600
		mkdir -p "$work/dev/pts" "$work/dev/shm"
		touch "$work/dev/console"
		mount --move "$work/dev" /dev
		mount -t devpts -o newinstance,ptmxmode=0666,mode=620 devpts /dev/pts
		ln -s pts/ptmx /dev/ptmx
		mount -t tmpfs -o nosuid,nodev,mode=1777 tmpfs /dev/shm
		ls /dev/tap* >/dev/null 2>&1 && fail "the container /dev has tap nodes"
	fi
	mount --bind "$work/console.log" /dev/console

	# No udev here, so device units (the LAN unit's Wants=/After= on its parent interface's
	# .device) never appear; systemd would wait DefaultDeviceTimeoutSec (90 s) for them on every
	# start. On a host with udev the device is there at once; here do not wait.
	printf '[Manager]\nDefaultDeviceTimeoutSec=1s\n' >"$work/system.conf"
	[[ -e /etc/systemd/system.conf ]] || fail "/etc/systemd/system.conf is missing"
	mount --bind "$work/system.conf" /etc/systemd/system.conf

	# PrivateTmp= makes directories under /tmp and /var/tmp: keep them in this namespace.
	mount -t tmpfs -o mode=1777 tmpfs /tmp
	mount -t tmpfs -o mode=1777 tmpfs /var/tmp

	# systemd makes / shared at boot on a host (mount-setup.c) but not when $container is set, as
	# here. Units with their own mount namespace need it: systemd 252 sets up a unit's
	# $CREDENTIALS_DIRECTORY (LoadCredential=) in the unit's namespace and lets it propagate.
	mount --make-rshared /

	export container=ec-lab
	export SYSTEMD_UNIT_PATH=/run/ec-lab/units
	export SYSTEMD_GENERATOR_PATH=/run/ec-lab/empty
	export SYSTEMD_ENVIRONMENT_GENERATOR_PATH=/run/ec-lab/empty
	exec /lib/systemd/systemd --system --unit=ec-lab.target --log-target=journal --show-status=no
}

case "$mode" in
outer) outer ;;
inner) inner ;;
*) fail "unknown mode (outer or inner)" ;;
esac
