# Sourced by the scripts: repository root, dependencies, and the Open MPI settings a small
# CI machine needs (root user, more ranks than cores). Kept out of the library on purpose.
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
bash ci/install-deps.sh ${CMAN_EXTRA_PACKAGES:-}
if [ "$(id -u)" -eq 0 ]; then
  export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
fi
export OMPI_MCA_rmaps_base_oversubscribe=1
