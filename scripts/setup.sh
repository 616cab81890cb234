#!/usr/bin/env bash
# Install everything into .venv at the repo root (idempotent): Python packages and this project.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3.11}
command -v "$PY" >/dev/null || PY=python3
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -r requirements.txt
.venv/bin/python -m pip install -q --no-deps -e .

# DICOMweb tests: Orthanc with its DICOMweb plugin, and Debian's Chromium for the OHIF browser test
# (needs root and a Debian mirror; nothing happens when they are installed already).
missing=""
[ -x /usr/sbin/Orthanc ] || missing="$missing orthanc"
[ -e /usr/share/orthanc/plugins/libOrthancDicomWeb.so ] || missing="$missing orthanc-dicomweb"
[ -x /usr/bin/chromium ] || missing="$missing chromium"
if [ -n "$missing" ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    apt-get update -q
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends $missing
  else
    echo "setup.sh: apt-get install$missing (as root) to run the DICOMweb and browser tests" >&2
  fi
fi
# playwright-core drives that Chromium (it downloads no browser of its own).
if command -v npm >/dev/null && [ ! -d tests/browser/node_modules/playwright-core ]; then
  (cd tests/browser && PLAYWRIGHT_SKIP_BROWSER_DOWNLOAD=1 npm ci --no-audit --no-fund)
fi
