#!/usr/bin/env bash
# Everything ebpf-slo-exporter needs on a Debian/Ubuntu machine, done once and said out loud:
#   1. apt packages: BCC for the system Python, kernel headers, venv, and the servers the
#      tests and benchmarks drive (nginx, wrk, tshark, prometheus);
#   2. /lib/modules/$(uname -r)/{build,source} linked to the nearest installed headers when
#      the running kernel has none (socket filters only touch uapi structures, so a nearby
#      version is fine);
#   3. .venv from /usr/bin/python3 with --system-site-packages (bcc comes from Debian, the
#      PyPI package called "bcc" is unrelated), with the project installed into it.
# Re-running it is cheap: each step checks first.
set -euo pipefail

here=$(cd "$(dirname "$0")/.." && pwd)
cd "$here"
say() { printf 'setup: %s\n' "$*"; }

if [ "$(id -u)" -ne 0 ]; then
  if command -v sudo >/dev/null 2>&1; then SUDO=sudo; else
    say "needs root for apt and the headers link: run it as root (sudo make setup)"; exit 1
  fi
else SUDO=""; fi

packages=(python3-bpfcc python3-venv python3-pip linux-headers-amd64 nginx-light wrk tshark prometheus prometheus-alertmanager libcap2-bin iproute2 curl openssl util-linux)
packages+=(nghttp2-client)  # h2load and curl --http2 for the HTTP/2 tests and bench
packages+=(chromium)  # the status page test renders / in headless Chromium
packages+=(podman runc mmdebstrap)  # make test-container builds and runs the image
[ "$(dpkg --print-architecture 2>/dev/null)" = arm64 ] && packages=("${packages[@]/linux-headers-amd64/linux-headers-arm64}")
missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "ok installed" || missing+=("$p")
done
if [ "${#missing[@]}" -gt 0 ]; then
  say "installing apt packages: ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  echo "wireshark-common wireshark-common/install-setuid boolean false" | $SUDO debconf-set-selections
  $SUDO apt-get update -qq
  $SUDO apt-get install -y -qq "${missing[@]}" >/dev/null
  # Debian starts these services on install; the tests and benches start their own.
  for service in nginx prometheus prometheus-alertmanager prometheus-node-exporter; do
    $SUDO systemctl disable --now "$service" >/dev/null 2>&1 || true
  done
  [ -f /run/nginx.pid ] && $SUDO kill "$(cat /run/nginx.pid)" >/dev/null 2>&1 || true
  $SUDO pkill -f '^/usr/bin/prometheus(-alertmanager|-node-exporter)?( |$)' >/dev/null 2>&1 || true
else
  say "apt packages present"
fi

release=$(uname -r)
modules="/lib/modules/$release"
if [ -e "$modules/build/include/linux/kconfig.h" ] || [ -e "$modules/build/include/generated/autoconf.h" ]; then
  say "kernel headers present at $modules/build"
else
  build=$(ls -d /usr/src/linux-headers-*-amd64 /usr/src/linux-headers-*-arm64 2>/dev/null | sort -V | tail -n 1 || true)
  common=$(ls -d /usr/src/linux-headers-*-common 2>/dev/null | sort -V | tail -n 1 || true)
  if [ -z "$build" ]; then
    say "no kernel headers under /usr/src: install linux-headers-\$(dpkg --print-architecture) and re-run"; exit 1
  fi
  $SUDO mkdir -p "$modules"
  [ -e "$modules/build" ] || $SUDO ln -sfn "$build" "$modules/build"
  [ -e "$modules/source" ] || $SUDO ln -sfn "${common:-$build}" "$modules/source"
  say "no headers for kernel $release: linked $modules/build -> $build and $modules/source -> ${common:-$build}"
fi

if [ ! -x .venv/bin/python ]; then
  say "creating .venv from /usr/bin/python3 with --system-site-packages"
  /usr/bin/python3 -m venv --system-site-packages .venv
fi
stamp=.venv/.installed
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
  say "installing the project and its test dependencies into .venv"
  # --ignore-installed: the venv sees system site-packages (for bcc), but our Python
  # dependencies must come from pyproject.toml, not from whatever the host has.
  .venv/bin/python -m pip install -q --disable-pip-version-check --ignore-installed -e ".[test]"
  touch "$stamp"
fi
if ! .venv/bin/python -c "import bcc" 2>/dev/null; then
  say "bcc does not import in .venv: is python3-bpfcc installed for /usr/bin/python3?"; exit 1
fi
say "ready: .venv/bin/ebpf-slo-exporter ($(.venv/bin/ebpf-slo-exporter --version 2>/dev/null || echo 'not runnable yet'))"
