#!/usr/bin/env bash
# Installs everything the node, the demo and the tests need on Debian/Ubuntu:
# Debian packages (when run as root), a virtualenv in .venv, and the project.
set -euo pipefail
cd "$(dirname "$0")/.."

DEBS=(orthanc orthanc-python orthanc-dicomweb orthanc-webviewer dcmtk dicom3tools
      python3-requests chromium chromium-driver curl openssl)
if [ "$(id -u)" = 0 ]; then
    missing=()
    for p in "${DEBS[@]}"; do dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p"); done
    if [ ${#missing[@]} -gt 0 ]; then
        apt-get update -qq
        # the packaged Orthanc service is not started here (no init in containers); tests start their own
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
    fi
else
    echo "not root: skipping Debian packages (${DEBS[*]}); install them for the demo and the full test suite" >&2
fi

PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip >/dev/null
# The CPU build of torch first, so the project's torch requirement installs nothing more.
.venv/bin/python -m pip install -q torch==2.13.0
.venv/bin/python -m pip install -q -e '.[test]'

# OHIF viewer (the npm package @ohif/app ships a built dist/) for the viewer test
OHIF_VERSION=3.13.2
if [ ! -f .cache/ohif/dist/index.html ] && command -v npm >/dev/null; then
    mkdir -p .cache/ohif
    (cd .cache/ohif && npm pack --silent "@ohif/app@${OHIF_VERSION}" >/dev/null \
        && tar xzf "ohif-app-${OHIF_VERSION}.tgz" && mv package/dist dist && rm -rf package ./*.tgz) \
        || echo "could not fetch @ohif/app ${OHIF_VERSION}: the OHIF viewer test will skip" >&2
fi
