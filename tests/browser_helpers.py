"""Helpers for the OHIF browser tests (tests/test_dicomweb_browser.py, tests/test_ohif_box.py): run a
driver in tests/browser (Debian's headless Chromium through npm playwright-core) and read its result."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest

from app_helpers import REPO_ROOT

BROWSER_DIR = REPO_ROOT / "tests" / "browser"
CHROMIUM = Path("/usr/bin/chromium")


def missing() -> str:
    """Why the browser tests cannot run here ('' when they can)."""
    if not CHROMIUM.exists():
        return "Debian's chromium is not installed (scripts/setup.sh installs it)"
    if shutil.which("node") is None:
        return "node is not installed"
    if not (BROWSER_DIR / "node_modules" / "playwright-core").is_dir():
        return "playwright-core is not installed in tests/browser (scripts/setup.sh runs npm ci there)"
    return ""


def run_driver(script: str, *args: str, out: Path) -> dict:
    """Run tests/browser/`script` with `args` (skip when the browser is missing); its result.json in `out`."""
    if missing():
        pytest.skip(missing())
    run = subprocess.run(["node", script, *args], cwd=BROWSER_DIR, capture_output=True, text=True, timeout=600)
    result = json.loads((out / "result.json").read_text()) if (out / "result.json").exists() else {}
    assert run.returncode == 0, f"browser driver failed:\n{run.stdout[-3000:]}\n{run.stderr[-3000:]}\n{result}"
    return result
