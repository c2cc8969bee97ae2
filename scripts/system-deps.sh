#!/usr/bin/env bash
# Install the system packages the tests need (Debian): the Mosquitto broker.
# As root with apt-get it installs what is missing; otherwise it stops and
# prints the one command to run.
set -euo pipefail

packages=()
command -v mosquitto >/dev/null 2>&1 || [ -x /usr/sbin/mosquitto ] || packages+=(mosquitto)

[ ${#packages[@]} -eq 0 ] && exit 0

if [ "$(id -u)" -eq 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "installing system packages: ${packages[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${packages[@]}" >/dev/null
    exit 0
fi

echo "missing system packages: ${packages[*]}" >&2
echo "run: sudo apt-get install -y ${packages[*]}" >&2
exit 1
