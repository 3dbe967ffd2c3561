#!/usr/bin/env bash
# Install the Debian packages the tests need (listed in tools/debian-packages.txt) when missing.
# Runs from `make test`; needs root and apt-get. Without them it says what to install and goes on:
# each test that needs a missing program fails with a message naming the package.
set -euo pipefail
cd "$(dirname "$0")"
mapfile -t wanted < <(grep -Ev '^\s*(#|$)' debian-packages.txt | awk '{print $1}')
missing=()
for pkg in "${wanted[@]}"; do
  dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
done
[ ${#missing[@]} -eq 0 ] && exit 0
if [ "$(id -u)" -ne 0 ] || ! command -v apt-get >/dev/null; then
  echo "system-deps: please install the Debian packages: ${missing[*]}" >&2
  exit 0
fi
echo "system-deps: installing ${missing[*]}"
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq >/dev/null
apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
