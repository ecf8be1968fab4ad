#!/usr/bin/env bash
# Installs the system packages the build and tests need, if missing: cmake, clang and libclang
# (for the llama.cpp bindings), a C++ compiler, Python 3 with pip (which fetches the default
# model), the PostgreSQL and Redis servers the storage and limit tests run against, Chromium
# (the browser the web pages' tests drive, through Python Playwright), and `kill` (procps).
# Debian/Ubuntu: uses apt-get (as root, or through sudo).
set -euo pipefail

need=()
command -v cmake >/dev/null || need+=(cmake)
command -v clang >/dev/null || need+=(clang)
ls /usr/lib/llvm-*/lib/libclang*.so* >/dev/null 2>&1 || ls /usr/lib/x86_64-linux-gnu/libclang*.so* >/dev/null 2>&1 || need+=(libclang-dev)
command -v g++ >/dev/null || need+=(g++)
command -v python3 >/dev/null || need+=(python3)
python3 -m pip --version >/dev/null 2>&1 || need+=(python3-pip)
ls /usr/lib/postgresql/*/bin/postgres >/dev/null 2>&1 || need+=(postgresql)
command -v redis-server >/dev/null || need+=(redis-server)
command -v chromium >/dev/null || need+=(chromium)
# The end-to-end tests stop servers with `kill -TERM`.
command -v kill >/dev/null || need+=(procps)

if [ ${#need[@]} -gt 0 ]; then
  echo "bootstrap: installing ${need[*]}" >&2
  SUDO=""
  [ "$(id -u)" -ne 0 ] && SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${need[@]}" >/dev/null
fi
command -v cargo >/dev/null || { echo "bootstrap: Rust (cargo) is required: https://rustup.rs" >&2; exit 1; }
