#!/usr/bin/env bash
# The main job on an embedded default, touching no real LAN:
#   a throwaway lab (a "host" and a "LAN" network namespace joined by veth, dnsmasq on the LAN side),
#   `ec-macvtap create` on the host side's veth, and `ec-ipxe-qemu run` with the built-in diagnostics
#   script under TCG. It prints the serial console lines that prove the user-mode boot and the LAN lease,
#   then stops and removes everything, whatever happens.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

if [ "$(id -u)" -ne 0 ]; then
	echo "demo: run as root (it creates network namespaces and a macvtap)" >&2
	exit 5
fi
scripts/install-deps.sh
echo "demo: building"
cargo build --release -q
bin=$PWD/target/release

id=$$
host=ecdemo-h$id
lan=ecdemo-l$id
work=$(mktemp -d /tmp/ec-demo.XXXXXX)
launcher_pid=
dnsmasq_pid=

cleanup() {
	set +e
	if [ -n "$launcher_pid" ] && kill -0 "$launcher_pid" 2>/dev/null; then
		kill -TERM "$launcher_pid"
		wait "$launcher_pid" 2>/dev/null
	fi
	[ -n "$dnsmasq_pid" ] && kill "$dnsmasq_pid" 2>/dev/null && wait "$dnsmasq_pid" 2>/dev/null
	ip netns list | grep -q "^$host" && "$bin/ec-macvtap" -q --netns "$host" delete ec-lan0 >/dev/null
	ip netns del "$host" 2>/dev/null
	ip netns del "$lan" 2>/dev/null
	rm -rf "$work"
	echo "demo: cleaned up (namespaces, macvtap, dnsmasq, QEMU, $work)"
}
trap cleanup EXIT INT TERM

echo "demo: lab: namespaces $host (host) and $lan (LAN), veth uplink <-> lanport, dnsmasq on 192.168.77.0/24"
ip netns add "$host"
ip netns add "$lan"
ip -n "$host" link add uplink type veth peer name lanport netns "$lan"
ip -n "$host" link set uplink up
ip -n "$lan" link set lanport up
ip -n "$lan" addr add 192.168.77.1/24 dev lanport
ip netns exec "$lan" "$(command -v dnsmasq || echo /usr/sbin/dnsmasq)" --no-daemon --conf-file=/dev/null \
	--interface=lanport --bind-interfaces --port=0 --dhcp-range=192.168.77.50,192.168.77.60,1h \
	--dhcp-leasefile="$work/leases" --pid-file= --user=root --log-dhcp --log-facility="$work/dnsmasq.log" 2>>"$work/dnsmasq.log" &
dnsmasq_pid=$!

echo "demo: \$ ec-macvtap --netns $host create --link uplink --name ec-lan0"
"$bin/ec-macvtap" --netns "$host" create --link uplink --name ec-lan0
mac=$("$bin/ec-macvtap" --netns "$host" --json show ec-lan0 | sed -n 's/.*"mac": "\([0-9a-f:]*\)".*/\1/p')

echo "demo: \$ ec-ipxe-qemu run --state-dir $work/state --accel tcg --no-disk --memory 256 --lan-interface ec-lan0"
ip netns exec "$host" "$bin/ec-ipxe-qemu" run --state-dir "$work/state" --accel tcg --no-disk --memory 256 \
	--lan-interface ec-lan0 --shutdown-timeout 3 2>"$work/launcher.log" &
launcher_pid=$!

serial=$work/state/serial.log
ok=
for _ in $(seq 1 180); do
	if grep -q "ec-ipxe-qemu: boot path OK" "$serial" 2>/dev/null; then
		ok=1
		break
	fi
	kill -0 "$launcher_pid" 2>/dev/null || break
	sleep 1
done
echo "demo: serial console (lines from the boot script):"
grep -a "ec-ipxe-qemu:" "$serial" 2>/dev/null | tr -d '\r' | sed 's/^/    /' || true
if [ -z "$ok" ]; then
	echo "demo: FAILED: no 'boot path OK' line; launcher log:" >&2
	sed 's/^/    /' "$work/launcher.log" >&2
	exit 1
fi
echo "demo: dnsmasq leases on the LAN (the macvtap's MAC is $mac):"
sed 's/^/    /' "$work/leases"
grep -qi "$mac" "$work/leases" || {
	echo "demo: FAILED: no lease for $mac" >&2
	exit 1
}

echo "demo: stopping the guest (SIGTERM to the launcher)"
kill -TERM "$launcher_pid"
rc=0
wait "$launcher_pid" || rc=$?
launcher_pid=
echo "demo: launcher exited with $rc"
"$bin/ec-macvtap" --netns "$host" delete ec-lan0
echo "demo: OK: user-mode iPXE boot and a LAN lease through the macvtap"
