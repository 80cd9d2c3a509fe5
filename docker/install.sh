#!/bin/sh
# The one install recipe of Lorry's image (docker/Dockerfile). tests/deploy/test_image.py replays the
# Dockerfile's RUN lines that call this script, in a fresh venv, so the image and the test cannot drift.
#
#   docker/install.sh SOURCE_DIR VENV_DIR [--deps-only]
#
# Installs exactly the versions pinned in SOURCE_DIR/uv.lock (`--locked` also refuses a lock file that
# no longer matches pyproject.toml), without the dev group, and Lorry itself as a regular (non-editable)
# wheel, so VENV_DIR is self-contained and SOURCE_DIR can be thrown away. `--deps-only` installs the
# third-party dependencies alone (a cacheable image layer that only changes with the lock file).
#
# Environment: UV (the uv binary, default `uv`), PYTHON (the interpreter, default `python3.11`).
set -eu

if [ "$#" -lt 2 ] || [ "$#" -gt 3 ]; then
    echo "usage: $0 SOURCE_DIR VENV_DIR [--deps-only]" >&2
    exit 2
fi
source_dir=$1
venv_dir=$2
only_deps=${3:-}
if [ -n "$only_deps" ] && [ "$only_deps" != "--deps-only" ]; then
    echo "unknown option: $only_deps" >&2
    exit 2
fi

export UV_PROJECT_ENVIRONMENT="$venv_dir"
export UV_PYTHON_DOWNLOADS=never

cd "$source_dir"
if [ -n "$only_deps" ]; then
    set -- --no-install-project
else
    set -- --no-editable
fi
"${UV:-uv}" sync --locked --no-dev --python "${PYTHON:-python3.11}" "$@"

if [ -z "$only_deps" ]; then
    "$venv_dir/bin/lorry" --help >/dev/null
fi
