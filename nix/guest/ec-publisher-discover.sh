# every-channel publisher guest: HDHomeRun tuner discovery check on lan0, result on the console.
#
# Run by the NixOS module (nix/modules/ec-publisher-guest.nix, unit every-channel-tuner-discovery) with PATH
# and EC_TUNER_ATTEMPTS set in front of this text, and verbatim by the project's Debian test guest
# (scripts/build-test-guest.sh). Needs: coreutils (seq, sleep, head), grep, iproute2 (or busybox ip),
# hdhomerun_config.
#
# A static tuner list, for LANs where broadcast does not reach the tuners (tvheadend's hdhomerun_ip): the
# credential ec.tuners (the unit imports it with ImportCredential=, so it is $CREDENTIALS_DIRECTORY/ec.tuners),
# IPv4 addresses one per line ('#' starts a comment). Whenever the broadcast finds nothing, each address is
# asked directly (a discovery request sent to that address, `hdhomerun_config discover IP`).
set -u
attempts=${EC_TUNER_ATTEMPTS:-12}
say() { echo "ec-publisher: tuner discovery: $*"; }

static=()
list=${CREDENTIALS_DIRECTORY:+$CREDENTIALS_DIRECTORY/ec.tuners}
if [ -n "$list" ] && [ -f "$list" ]; then
  while IFS= read -r entry || [ -n "$entry" ]; do
    entry=${entry%%#*}
    entry=${entry//[[:space:]]/}
    [ -n "$entry" ] || continue
    if [[ $entry =~ ^[0-9]{1,3}(\.[0-9]{1,3}){3}$ ]]; then
      static+=("$entry")
    else
      say "ec.tuners: ignoring \"$entry\" (not an IPv4 address)"
    fi
  done <"$list"
  say "static tuner list ec.tuners: ${static[*]:-no addresses}"
fi

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
  found=0
  for ip in "${static[@]}"; do
    out=$(hdhomerun_config discover "$ip" 2>&1 || true)
    if echo "$out" | grep -q '^hdhomerun device'; then
      echo "$out" | grep '^hdhomerun device' | while read -r dev; do say "FOUND $dev (ec.tuners)"; done
      found=1
    else
      say "attempt $attempt: $ip (ec.tuners): ${out:-no answer}"
    fi
  done
  [ "$found" = 1 ] && exit 0
  sleep 5
done
if [ "${#static[@]}" -gt 0 ]; then
  say "NO TUNER FOUND on lan0 (no reply to the UDP 65001 broadcast or from ${static[*]} of ec.tuners)"
else
  say "NO TUNER FOUND on lan0 (HDHomeRun UDP 65001 broadcast got no reply)"
fi
exit 1
