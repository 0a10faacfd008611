#!/bin/sh
# Rebuild avatar/serve/static/viewer.js (Spark + three.js + our wrapper, one minified IIFE).
# Usage (from anywhere): sh web/viewer/build.sh
set -eu
cd "$(dirname "$0")"
OUT=../../avatar/serve/static
mkdir -p "$OUT"
npm ci --no-audit --no-fund
npx --no-install esbuild entry.js \
  --bundle \
  --format=iife \
  --global-name=AvatarViewer \
  --platform=browser \
  --target=es2020 \
  --minify \
  --legal-comments=none \
  --log-level=warning \
  --outfile="$OUT/viewer.js"
# Full licence texts of everything inside viewer.js.
{
  echo "Third-party software bundled in viewer.js (built from web/viewer, see its README.md)."
  for pkg in @sparkjsdev/spark three fflate; do
    ver=$(node -p "require('./node_modules/$pkg/package.json').version")
    lic=$(node -p "require('./node_modules/$pkg/package.json').license")
    echo
    echo "================================================================================"
    echo "$pkg $ver ($lic)"
    echo "================================================================================"
    cat "node_modules/$pkg/LICENSE"
  done
} > "$OUT/THIRD_PARTY_LICENSES.txt"
ls -l "$OUT/viewer.js" "$OUT/THIRD_PARTY_LICENSES.txt"
