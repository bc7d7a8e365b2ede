#!/usr/bin/env bash
# Set up on a fresh machine (first run only) and run the test suite. Extra arguments go to pytest.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
. "$root/launch/setup_env.sh"
cd "$root"
# pytest exits 5 when it collected no test: that is a failure here, as is any other non-zero status.
exec python -m pytest -q "$@"
