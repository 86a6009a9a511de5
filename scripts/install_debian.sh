#!/usr/bin/env bash
# Installs a Debian package the project needs, unless it is already there:
#   fashion-mnist  dataset-fashion-mnist (the built-in `fashion-mnist` dataset)
#   chromium       chromium (the dashboard's browser test drives it headless)
# Needs root; without it, the tests that need the package skip outside CI and fail in CI.
set -euo pipefail
case "${1:-}" in
    fashion-mnist) present=/usr/share/datasets/fashion-mnist; package=dataset-fashion-mnist ;;
    chromium) present=/usr/bin/chromium; package=chromium ;;
    *) echo "usage: $0 fashion-mnist|chromium" >&2; exit 2 ;;
esac
if [ -e "$present" ]; then
    exit 0
fi
if [ "$(id -u)" != 0 ]; then
    echo "install_debian: not root, so $package cannot be installed; its tests will skip" >&2
    exit 0
fi
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends "$package" >/dev/null
echo "install_debian: installed $package $(dpkg-query -W -f='${Version}' "$package")"
