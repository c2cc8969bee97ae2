#!/usr/bin/env bash
# Install the system packages the tests need (Debian): the Mosquitto broker, Prometheus
# (the /metrics test scrapes the controller with a real one), headless Chromium with its
# driver (the dashboard test) and systemd-analyze (the unit files' checks). As root with
# apt-get it installs what is missing; otherwise it stops and prints the one command to run.
set -euo pipefail

packages=()
have() { command -v "$1" >/dev/null 2>&1 || [ -x "/usr/sbin/$1" ] || [ -x "/usr/bin/$1" ]; }
have mosquitto || packages+=(mosquitto)
have prometheus || packages+=(prometheus)
have chromium || packages+=(chromium)
have chromedriver || packages+=(chromium-driver)
have systemd-analyze || packages+=(systemd)

[ ${#packages[@]} -eq 0 ] && exit 0

if [ "$(id -u)" -eq 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "installing system packages: ${packages[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${packages[@]}" >/dev/null
    # The Debian packages start services of their own; the tests run their own instances.
    if command -v systemctl >/dev/null 2>&1; then
        systemctl disable --now prometheus >/dev/null 2>&1 || true
    fi
    exit 0
fi

echo "missing system packages: ${packages[*]}" >&2
echo "run: sudo apt-get install -y ${packages[*]}" >&2
exit 1
