#!/usr/bin/env bash
# Install what the explorer's real-browser test (tests/test_app_browser.py) needs:
# Debian's chromium (/usr/bin/chromium) and the Playwright Python driver, which drives that binary
# through executable_path (Playwright's own browser download is never used).
# Idempotent: skips the apt step when chromium is already installed. Called from .ci/run.
set -euo pipefail
if ! command -v chromium >/dev/null 2>&1; then
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends chromium fonts-dejavu-core >/dev/null
fi
python -m pip install -q "playwright>=1.40"
chromium --version 2>/dev/null || true
python -c "from importlib.metadata import version; import playwright.sync_api; print('playwright', version('playwright'))"
