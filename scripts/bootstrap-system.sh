#!/usr/bin/env bash
# Installs the OS packages the endpoint's demo and tests need, when missing:
# RabbitMQ (the embedded broker), and python3-venv where Python lacks venv;
# with arguments, more: postgresql, containers (podman, docker.io, runc).
# Debian/Ubuntu; runs apt-get as root or through sudo.  Idempotent.
set -euo pipefail

want=()
[ -x /usr/lib/rabbitmq/bin/rabbitmq-server ] || want+=(rabbitmq-server)
if ! python3 -c 'import venv, ensurepip' >/dev/null 2>&1; then
  want+=(python3-venv)
fi
for extra in "$@"; do
  case "$extra" in
    postgresql) command -v pg_ctlcluster >/dev/null 2>&1 && [ -n "$(ls /usr/lib/postgresql/*/bin/initdb 2>/dev/null)" ] || want+=(postgresql) ;;
    # The container tests' engines (funcx_endpoint/testing/engines.py): Podman and
    # a private Docker daemon, both on runc.
    containers)
      command -v podman >/dev/null 2>&1 || want+=(podman)
      command -v dockerd >/dev/null 2>&1 || want+=(docker.io)
      command -v runc >/dev/null 2>&1 || want+=(runc)
      ;;
    *) want+=("$extra") ;;
  esac
done
[ ${#want[@]} -eq 0 ] && exit 0

if [ "$(id -u)" -eq 0 ]; then
  SUDO=()
elif command -v sudo >/dev/null 2>&1; then
  SUDO=(sudo)
else
  echo "Missing OS packages: ${want[*]}; install them as root (apt-get install ${want[*]})" >&2
  exit 1
fi
if ! command -v apt-get >/dev/null 2>&1; then
  echo "Missing OS packages: ${want[*]}; this script knows only apt-get (Debian/Ubuntu)." >&2
  exit 1
fi
echo ">>> Installing OS packages: ${want[*]}"
export DEBIAN_FRONTEND=noninteractive
"${SUDO[@]}" apt-get update -q
# policy-rc.d or not, the packages' own services are not what we use: the
# project starts private RabbitMQ/PostgreSQL instances on free ports.
"${SUDO[@]}" apt-get install -y -q --no-install-recommends "${want[@]}"
