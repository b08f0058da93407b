#!/usr/bin/env bash
# Developer build: compile the extension (incrementally, build dir under ./build) and install the
# package into a private folder, so several worktrees can build and test side by side.
#   tools/dev_install.sh /tmp/site-mine   then   PYTHONPATH=/tmp/site-mine python -m pytest tests
set -euo pipefail
target="${1:?usage: tools/dev_install.sh TARGET_DIR}"
cd "$(dirname "$0")/.."
python -m pip install --no-build-isolation --no-deps --upgrade -q --target "$target" \
  -Cbuild-dir=build/dev .
