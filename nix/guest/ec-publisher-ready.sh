# every-channel publisher guest: tell the host's launcher on ttyS0 that the guest is up. What the launcher
# waits for (its default --ready-pattern) is the last line; before it come the credentials line when the
# publisher expects credentials, and the LAN address line when there is a LAN NIC.
#
# Run by the NixOS module (nix/modules/ec-publisher-guest.nix, unit every-channel-publisher-ready) with PATH
# and EC_CREDENTIALS set in front of this text, and verbatim by the project's Debian test guest
# (scripts/build-test-guest.sh). Needs: coreutils (seq, sleep, head), grep, iproute2 (or busybox ip).
#
# EC_CREDENTIALS: the credential names the publisher expects, one per line. The unit imports them
# (ImportCredential=), so they are the files of $CREDENTIALS_DIRECTORY; one that is not there is marked
# "(missing)". Names only: a value never reaches the console.
set -u
expected=${EC_CREDENTIALS:-}
if [ -n "$expected" ]; then
  line=""
  while IFS= read -r name; do
    [ -n "$name" ] || continue
    if [ -n "${CREDENTIALS_DIRECTORY:-}" ] && [ -f "$CREDENTIALS_DIRECTORY/$name" ]; then
      line+=" $name"
    else
      line+=" $name(missing)"
    fi
  done <<<"$expected"
  echo "ec-publisher: credentials$line"
fi
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
