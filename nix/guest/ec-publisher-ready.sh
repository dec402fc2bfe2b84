# every-channel publisher guest: tell the host's launcher on ttyS0 that the guest is up. What the launcher
# waits for (its default --ready-pattern) is the last line; the LAN address line comes first when there is a
# LAN NIC.
#
# Run by the NixOS module (nix/modules/ec-publisher-guest.nix, unit every-channel-publisher-ready) with PATH
# set in front of this text, and verbatim by the project's Debian test guest (scripts/build-test-guest.sh).
# Needs: coreutils (seq, sleep, head), grep, iproute2 (or busybox ip).
set -u
if ip link show dev lan0 >/dev/null 2>&1; then
  # networkd may still be negotiating the LAN lease.
  addr=""
  for _ in $(seq 1 30); do
    addr=$(ip -4 -o addr show dev lan0 scope global | grep -o 'inet [0-9.]*' | head -n1 || true)
    [ -n "$addr" ] && break
    sleep 1
  done
  addr=${addr#inet }
  echo "ec-publisher: lan ${addr:-none}"
fi
echo "ec-publisher: ready"
