#!/bin/sh
# Install what the phone lab (llc/lab/) needs: Google's adbd, the adb client,
# iproute2 (ip, tc), util-linux (unshare, nsenter), and for link latency iptables
# and libnetfilter-queue-dev (the NetfilterQueue package, pip install '.[lab]',
# builds against it). Idempotent; run as root.
#
# Why backports: on bookworm, adbd exists only in bookworm-backports, and the
# bookworm `adb` (29.x) pins android-libcutils 29 while that adbd needs 34, so
# adb comes from backports too. The backports source is added only for this
# install and removed again, so the machine's pinned sources stay as they were.
set -eu

ADBD=/usr/lib/android-sdk/platform-tools/adbd
export DEBIAN_FRONTEND=noninteractive

if [ -x "$ADBD" ] && command -v adb >/dev/null && command -v tc >/dev/null \
   && command -v unshare >/dev/null && command -v nsenter >/dev/null \
   && command -v iptables-legacy >/dev/null && [ -f /usr/include/libnetfilter_queue/libnetfilter_queue.h ]; then
    echo "lab deps: already installed ($(adb version | sed -n 2p))"
    exit 0
fi
if [ "$(id -u)" != 0 ]; then
    echo "lab deps: run as root" >&2
    exit 1
fi

. /etc/os-release
if [ "${VERSION_CODENAME:-}" = bookworm ]; then
    src=/etc/apt/sources.list.d/llc-lab-bookworm-backports.sources
    trap 'rm -f "$src"' EXIT INT TERM
    cat > "$src" <<'EOF'
Types: deb
URIs: http://deb.debian.org/debian
Suites: bookworm-backports
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
EOF
    timeout 600 apt-get update -q
    timeout 900 apt-get install -y -q -t bookworm-backports adbd adb
    rm -f "$src"
    trap - EXIT INT TERM
    timeout 900 apt-get install -y -q iproute2 util-linux iptables libnetfilter-queue-dev
else
    # newer Debian ships adbd in its main suite
    timeout 600 apt-get update -q
    timeout 900 apt-get install -y -q adbd adb iproute2 util-linux iptables libnetfilter-queue-dev
fi

test -x "$ADBD"
adb version | sed -n 2p
echo "lab deps: installed"
