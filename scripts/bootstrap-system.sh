#!/usr/bin/env bash
# Installs the OS packages the endpoint's demo and tests need, when missing:
# RabbitMQ (the embedded broker), and python3-venv where Python lacks venv.
# Extras named as arguments: postgresql (the service's second backend), slurm
# (the private Slurm cluster of the tests: slurmctld, slurmd, slurmdbd and the
# client commands, MariaDB's server and client cores for the accounting that
# sacct reads, iproute2 for the nodes' network namespaces), mpi (MPICH with its
# compiler wrapper and headers, for the real MPI tests across the cluster's nodes),
# containers (podman, docker.io, runc: the container tests' engines), systemd
# (systemd-analyze, to verify enable-on-boot's units), browser (Chromium and its
# chromedriver: the portal's browser test and benchmark drive them headless).
# Debian/Ubuntu; runs apt-get as root or through sudo.  Idempotent: only what
# is missing is installed.
set -euo pipefail

# A program in PATH or in an sbin directory (not in a non-root user's PATH).
have() {
  command -v "$1" >/dev/null 2>&1 || [ -x "/usr/sbin/$1" ] || [ -x "/sbin/$1" ]
}

want=()
[ -x /usr/lib/rabbitmq/bin/rabbitmq-server ] || want+=(rabbitmq-server)
if ! python3 -c 'import venv, ensurepip' >/dev/null 2>&1; then
  want+=(python3-venv)
fi
for extra in "$@"; do
  case "$extra" in
    systemd) command -v systemd-analyze >/dev/null 2>&1 || want+=(systemd) ;;
    postgresql) command -v pg_ctlcluster >/dev/null 2>&1 && [ -n "$(ls /usr/lib/postgresql/*/bin/initdb 2>/dev/null)" ] || want+=(postgresql) ;;
    slurm)
      have slurmctld || want+=(slurmctld)
      have slurmd || want+=(slurmd)
      have slurmdbd || want+=(slurmdbd)
      have sbatch && have sacct || want+=(slurm-client)
      have mariadbd && have mariadb-install-db || want+=(mariadb-server-core)
      have mariadb && have my_print_defaults || want+=(mariadb-client-core)
      have ip || want+=(iproute2)
      ;;
    mpi)
      have mpiexec.hydra && have mpicc || want+=(mpich)
      [ -n "$(ls /usr/include/*/mpich/mpi.h 2>/dev/null)" ] || want+=(libmpich-dev)
      have gcc || want+=(gcc libc6-dev)
      ;;
    # The container tests' engines (funcx_endpoint/testing/engines.py): Podman and
    # a private Docker daemon, both on runc.
    containers)
      command -v podman >/dev/null 2>&1 || want+=(podman)
      command -v dockerd >/dev/null 2>&1 || want+=(docker.io)
      command -v runc >/dev/null 2>&1 || want+=(runc)
      ;;
    browser)
      [ -x /usr/bin/chromium ] || want+=(chromium)
      [ -x /usr/bin/chromedriver ] || want+=(chromium-driver)
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
# project starts private RabbitMQ/PostgreSQL instances and Slurm clusters on
# free ports (slurmctld's own service finds no /etc/slurm/slurm.conf and stays down).
"${SUDO[@]}" apt-get install -y -q --no-install-recommends "${want[@]}"
