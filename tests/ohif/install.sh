#!/usr/bin/env bash
# Install the OHIF viewer test harness's JavaScript pieces into a cache folder outside the repo:
#   $AINODE_OHIF_CACHE (default ${AINODE_CACHE:-~/.cache/ainode}/ohif)
#     app-<version>/dist/      the built OHIF v3 viewer (npm package @ohif/app, tarball only, no deps)
#     node_modules/puppeteer-core
# Idempotent: does nothing when both are there. Never downloads a browser (uses Debian's chromium).
# Prints the cache folder on its last line.
set -euo pipefail

OHIF_VERSION="${AINODE_OHIF_VERSION:-3.13.2}"
PUPPETEER_VERSION="${AINODE_PUPPETEER_VERSION:-24.43.1}"   # 25.x needs node 22
CACHE="${AINODE_OHIF_CACHE:-${AINODE_CACHE:-$HOME/.cache/ainode}/ohif}"
export PUPPETEER_SKIP_DOWNLOAD=1 PUPPETEER_SKIP_CHROME_DOWNLOAD=1 npm_config_update_notifier=false npm_config_fund=false npm_config_audit=false

command -v npm >/dev/null || { echo "install.sh: npm not found" >&2; exit 2; }
mkdir -p "$CACHE"

app="$CACHE/app-$OHIF_VERSION"
if [ ! -f "$app/dist/index.html" ]; then
  tmp="$(mktemp -d "$CACHE/.app-XXXXXX")"
  trap 'rm -rf "$tmp"' EXIT
  # Only the package's own tarball: its dependencies are bundled into dist/ already.
  (cd "$tmp" && npm pack --silent "@ohif/app@$OHIF_VERSION" >/dev/null)
  tar -xzf "$tmp"/ohif-app-"$OHIF_VERSION".tgz -C "$tmp"
  [ -f "$tmp/package/dist/index.html" ] || { echo "install.sh: no dist/index.html in @ohif/app@$OHIF_VERSION" >&2; exit 1; }
  rm -rf "$app"
  mv "$tmp/package" "$app"
  rm -rf "$tmp"
  trap - EXIT
fi

have_pptr="$(node -e "try{console.log(require('$CACHE/node_modules/puppeteer-core/package.json').version)}catch(e){}" 2>/dev/null || true)"
if [ "$have_pptr" != "$PUPPETEER_VERSION" ]; then
  [ -f "$CACHE/package.json" ] || echo '{"name":"ainode-ohif-harness","private":true}' > "$CACHE/package.json"
  npm install --silent --no-save --prefix "$CACHE" "puppeteer-core@$PUPPETEER_VERSION" >/dev/null
fi
echo "$CACHE"
