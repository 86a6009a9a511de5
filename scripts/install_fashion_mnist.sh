#!/usr/bin/env bash
# Installs Debian's dataset-fashion-mnist (the built-in `fashion-mnist` dataset). Needs root; without it, the
# tests that need the package skip outside CI and fail in CI.
set -euo pipefail
if [ -d /usr/share/datasets/fashion-mnist ]; then
    exit 0
fi
if [ "$(id -u)" != 0 ]; then
    echo "install_fashion_mnist: not root, so dataset-fashion-mnist cannot be installed; its tests will skip" >&2
    exit 0
fi
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends dataset-fashion-mnist >/dev/null
echo "install_fashion_mnist: installed $(dpkg-query -W -f='${Version}' dataset-fashion-mnist)"
