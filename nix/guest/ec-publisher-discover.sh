# every-channel publisher guest: HDHomeRun tuner discovery check on lan0, result on the console.
#
# Run by the NixOS module (nix/modules/ec-publisher-guest.nix, unit every-channel-tuner-discovery) with PATH
# and EC_TUNER_ATTEMPTS set in front of this text, and verbatim by the project's Debian test guest
# (scripts/build-test-guest.sh). Needs: coreutils (seq, sleep, head), grep, iproute2 (or busybox ip),
# hdhomerun_config.
set -u
attempts=${EC_TUNER_ATTEMPTS:-12}
say() { echo "ec-publisher: tuner discovery: $*"; }

if ! ip link show dev lan0 >/dev/null 2>&1; then
  say "skipped: no LAN NIC (lan0); the host runs without lan.enable"
  exit 0
fi

# networkd may still be negotiating the LAN lease.
for _ in $(seq 1 60); do
  ip -4 -o addr show dev lan0 scope global | grep -q inet && break
  sleep 1
done
addr=$(ip -4 -o addr show dev lan0 scope global | grep -o 'inet [0-9./]*' || true)
say "lan0 ${addr:-has no IPv4 address}"

for attempt in $(seq 1 "$attempts"); do
  out=$(hdhomerun_config discover 2>&1 || true)
  if echo "$out" | grep -q '^hdhomerun device'; then
    echo "$out" | grep '^hdhomerun device' | while read -r found; do say "FOUND $found"; done
    exit 0
  fi
  say "attempt $attempt: ${out:-no answer}"
  sleep 5
done
say "NO TUNER FOUND on lan0 (HDHomeRun UDP 65001 broadcast got no reply)"
exit 1
