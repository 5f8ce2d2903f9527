#!/usr/bin/env bash
# Initialise the development tokens by hand (keysvc serve does the same on first start).
# usage: softhsm-config/init-tokens.sh STATE_DIR
set -euo pipefail
state=${1:-.keysvc}
mkdir -p "$state/hsm/tokens" "$state/hsm/pins"
sed "s#@TOKENDIR@#$(realpath "$state")/hsm/tokens#" "$(dirname "$0")/softhsm2.conf.in" > "$state/hsm/softhsm2.conf"
export SOFTHSM2_CONF="$state/hsm/softhsm2.conf"
for p in s1sp dco admin; do
  label="keysvc-$p"
  if ! softhsm2-util --show-slots | grep -q "Label:.*$label\b"; then
    [ -f "$state/hsm/pins/$p.pin" ] || (umask 077; head -c 12 /dev/urandom | od -An -tx1 | tr -d ' \n' > "$state/hsm/pins/$p.pin")
    softhsm2-util --init-token --free --label "$label" --so-pin "$(head -c 12 /dev/urandom | od -An -tx1 | tr -d ' \n')" --pin "$(cat "$state/hsm/pins/$p.pin")" >/dev/null
  fi
done
