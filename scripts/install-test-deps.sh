#!/usr/bin/env bash
# Installs the system programs the tests start for themselves (each test starts its own instance
# on a free port in a temp dir). Does nothing when they are already there.
set -euo pipefail
need=()
command -v redis-server >/dev/null 2>&1 || need+=(redis-server)
ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || need+=(postgresql)
# promtool and a Prometheus server: tests/deploy/ check and unit-test the rules and run dashboard queries.
command -v promtool >/dev/null 2>&1 || need+=(prometheus)
# sqlite3: the disaster-recovery drill backs up a gateway key database with `sqlite3 .backup`.
command -v sqlite3 >/dev/null 2>&1 || need+=(sqlite3)
# The deploy tests (tests/deploy/): a Docker daemon and its runtime, Debian's client (BuildKit builds
# without buildx), debootstrap for the local base image; Compose and hadolint come from the dev extra.
command -v dockerd >/dev/null 2>&1 || need+=(docker.io)
[ -x /usr/bin/docker ] || need+=(docker.io)
command -v containerd >/dev/null 2>&1 || need+=(containerd)
command -v runc >/dev/null 2>&1 || need+=(runc)
command -v iptables >/dev/null 2>&1 || need+=(iptables)
command -v debootstrap >/dev/null 2>&1 || need+=(debootstrap)
# The console tests (tests/console/) drive Debian's Chromium through Playwright (`playwright install`
# cannot download browsers here; the tests launch /usr/bin/chromium).
[ -x /usr/bin/chromium ] || need+=(chromium)
# curl: the console test uses a key made in the browser the way the README does, with curl.
command -v curl >/dev/null 2>&1 || need+=(curl)
if [ ${#need[@]} -gt 0 ]; then
  echo "installing test dependencies: ${need[*]}"
  sudo_cmd=""
  [ "$(id -u)" -eq 0 ] || sudo_cmd="sudo"
  $sudo_cmd apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo_cmd apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi
