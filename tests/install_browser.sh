#!/bin/sh
# The browser the dashboard test drives: headless Chromium and its WebDriver from Debian's packages (Playwright's
# and Selenium Manager's own downloads need hosts CI cannot reach). `make test` runs this; it does nothing when
# both are installed, and needs root (or sudo) otherwise.
set -eu
if command -v chromium >/dev/null 2>&1 && command -v chromedriver >/dev/null 2>&1; then
  exit 0
fi
SUDO=""
if [ "$(id -u)" != "0" ]; then
  command -v sudo >/dev/null 2>&1 || { echo "install_browser: need root or sudo to apt-get install chromium" >&2; exit 1; }
  SUDO="sudo"
fi
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq
$SUDO apt-get install -y -qq --no-install-recommends chromium chromium-driver >/dev/null
