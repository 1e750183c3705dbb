#!/usr/bin/env bash
# Install the tools the operations tests drive: promtool (Debian prometheus), headless Chromium
# (Debian chromium, driven by Playwright with executable_path, since `playwright install` cannot
# download browsers here), and the Helm renderer / schema validator / YAML linter from PyPI.
# Idempotent: each step is skipped when its tool is already there. Run as root (apt-get).
set -euo pipefail

VENV=${VENV:-.venv}
PY="$VENV/bin/python"

apt_updated=0
apt_install() {
  if [ "$apt_updated" = 0 ]; then apt-get update -qq; apt_updated=1; fi
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$@" >/dev/null
}

command -v promtool >/dev/null || apt_install prometheus
[ -x /usr/bin/chromium ] || apt_install chromium fonts-dejavu-core

# Pins: helm-python-sdk is young (its Helm library API moves), so it is pinned exactly.
if ! "$PY" -c "import playwright, helm_python, kubernetes_validate, yamllint" 2>/dev/null; then
  "$PY" -m pip install -q "playwright==1.65.2" "helm-python-sdk==0.2.2" "kubernetes-validate==1.37.0" \
    "yamllint>=1.35,<2"
fi
echo "test tools: promtool $(promtool --version 2>&1 | head -n1 | awk '{print $3}'), chromium, playwright, helm-python-sdk, kubernetes-validate, yamllint"
