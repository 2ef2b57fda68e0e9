#!/usr/bin/env bash
# Fetch PEFT's own test suite (it ships only in the sdist, not in the wheel) into a cache directory, idempotently.
#
#   tests/peft_suite/fetch_peft_tests.sh [VERSION]
#
# VERSION defaults to $PEFT_VERSION, else the installed peft's version. On success the last line printed on stdout is
# the directory holding the extracted tests/ (testing_common.py, test_custom_models.py, ...). Nothing is vendored into
# this repository.
#
# Environment:
#   SVFIT_PEFT_TESTS_DIR  use this extracted tests/ directory as is (no download), e.g. /tmp/peft-0.21.2/tests
#   SVFIT_CACHE           cache root (default: ${XDG_CACHE_HOME:-~/.cache}/svfit); tests go to
#                         $SVFIT_CACHE/peft-<VERSION>-tests
#   PYTHON                interpreter whose pip downloads the sdist (default: python)
#   PIP_*                 the usual pip settings (index URL of a mirror, ...)
#   SVFIT_PIP_RETRIES, SVFIT_PIP_TIMEOUT  pip's --retries (default 1) and --timeout (default 30 s), so that an
#                         offline run gives up quickly
#
# Exit status: 0 with the directory printed, non-zero (and a reason on stderr) when the sdist cannot be fetched,
# e.g. offline without a package mirror.
set -euo pipefail

PYTHON="${PYTHON:-python}"
VERSION="${1:-${PEFT_VERSION:-}}"
if [[ -z "$VERSION" ]]; then
    VERSION="$("$PYTHON" -c 'from importlib.metadata import version; print(version("peft"))')" || {
        echo "fetch_peft_tests: cannot determine the peft version (is peft installed for $PYTHON?)" >&2
        exit 2
    }
fi

if [[ -n "${SVFIT_PEFT_TESTS_DIR:-}" ]]; then
    if [[ -f "$SVFIT_PEFT_TESTS_DIR/testing_common.py" && -f "$SVFIT_PEFT_TESTS_DIR/test_custom_models.py" ]]; then
        echo "$SVFIT_PEFT_TESTS_DIR"
        exit 0
    fi
    echo "fetch_peft_tests: SVFIT_PEFT_TESTS_DIR=$SVFIT_PEFT_TESTS_DIR holds no PEFT tests" >&2
    exit 3
fi

CACHE_ROOT="${SVFIT_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/svfit}"
DEST="$CACHE_ROOT/peft-$VERSION-tests"
MARKER="$DEST/.complete"

if [[ -f "$MARKER" ]]; then
    echo "$DEST"
    exit 0
fi

mkdir -p "$CACHE_ROOT"
WORK="$(mktemp -d "$CACHE_ROOT/.fetch-peft-$VERSION.XXXXXX")"
trap 'rm -rf "$WORK"' EXIT

if ! "$PYTHON" -m pip download --quiet --disable-pip-version-check --retries "${SVFIT_PIP_RETRIES:-1}" \
    --timeout "${SVFIT_PIP_TIMEOUT:-30}" --no-deps --no-binary :all: "peft==$VERSION" -d "$WORK/dl" >&2; then
    echo "fetch_peft_tests: could not download the peft==$VERSION sdist (offline, or no package mirror?)" >&2
    exit 4
fi

SDIST="$(find "$WORK/dl" -maxdepth 1 -name 'peft-*.tar.gz' | head -n 1)"
if [[ -z "$SDIST" ]]; then
    echo "fetch_peft_tests: pip gave no peft sdist (.tar.gz) for peft==$VERSION" >&2
    exit 5
fi

mkdir -p "$WORK/x"
# only the tests/ folder of the sdist (its top-level folder is peft-<version>/)
tar -xzf "$SDIST" -C "$WORK/x" --wildcards '*/tests/*'
SRC="$(find "$WORK/x" -mindepth 2 -maxdepth 2 -type d -name tests | head -n 1)"
if [[ -z "$SRC" || ! -f "$SRC/testing_common.py" ]]; then
    echo "fetch_peft_tests: the peft==$VERSION sdist has no tests/testing_common.py" >&2
    exit 6
fi
touch "$SRC/.complete"

# Publish atomically: a concurrent run may have finished first, in which case its copy is kept.
rm -rf "$DEST.tmp.$$"
mv "$SRC" "$DEST.tmp.$$"
if ! mv -T "$DEST.tmp.$$" "$DEST" 2>/dev/null; then
    rm -rf "$DEST.tmp.$$"
    if [[ ! -f "$MARKER" ]]; then
        echo "fetch_peft_tests: $DEST exists but is incomplete; remove it and retry" >&2
        exit 7
    fi
fi
echo "$DEST"
