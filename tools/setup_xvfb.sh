#!/usr/bin/env bash
# What the teleop viewer's tests (tests/teleop/test_viewer.py, test_cli_errors.py) need from the system: an X server
# without a screen (Xvfb) and xdotool (to find the viewer window and type keys into it).
# Idempotent and quiet: when both are there it returns at once. Needs root (or passwordless sudo) and apt-get
# (Debian/Ubuntu); anywhere else it says what to install and exits 1 (`make test` goes on: only the tests that
# need a display fail, saying so).
set -euo pipefail

need=()
command -v Xvfb >/dev/null 2>&1 || need+=(xvfb)
command -v xdotool >/dev/null 2>&1 || need+=(xdotool)
[ ${#need[@]} -eq 0 ] && exit 0

if ! command -v apt-get >/dev/null 2>&1; then
    echo "setup_xvfb: apt-get not found; install ${need[*]} (Xvfb and xdotool) with this system's package manager" >&2
    exit 1
fi
SUDO=()
if [ "$(id -u)" -ne 0 ]; then
    if command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
        SUDO=(sudo -n)
    else
        echo "setup_xvfb: needs root: apt-get install -y --no-install-recommends ${need[*]}" >&2
        exit 1
    fi
fi

echo "setup_xvfb: installing ${need[*]} with apt (about 10 s) ..." >&2
log=$(mktemp)
trap 'rm -f "$log"' EXIT
export DEBIAN_FRONTEND=noninteractive
# ${SUDO[@]+...}: an empty array expands to nothing under `set -u` (bash before 4.4 calls it unbound otherwise).
run_apt() { ${SUDO[@]+"${SUDO[@]}"} apt-get -o DPkg::Lock::Timeout=60 "$@"; }
install() { run_apt install -y -q --no-install-recommends "${need[@]}"; }
# Cached package lists can be stale (404 on download): refresh them once and try again.
if ! install >"$log" 2>&1; then
    if ! { run_apt update -q && install; } >>"$log" 2>&1; then
        tail -20 "$log" >&2
        echo "setup_xvfb: apt-get install ${need[*]} failed (last lines of its log above)" >&2
        exit 1
    fi
fi
for cmd in Xvfb xdotool; do
    command -v "$cmd" >/dev/null 2>&1 || { echo "setup_xvfb: $cmd still missing after the install" >&2; exit 1; }
done
