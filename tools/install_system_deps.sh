#!/usr/bin/env bash
# The Debian packages `make test` needs besides the Python venv; `make test` (and
# `make test-engines`) run this first, through the Makefile's `system-deps` target.
#
#   chromium, chromium-driver        the browser tests (tests/browser.py); without them they skip
#   mariadb-server                   the ML Metadata tests on MySQL (tests/mariadb.py); they skip
#   openjdk-17-jdk-headless, maven   `make engines` (the Flink and Spark jars, tools/engines/*.java):
#                                    without them `make test` stops there
#
# Run as root where apt-get exists (CI): installs what is missing, quietly, one line per
# thing installed. Otherwise: one line per missing thing naming the command that installs
# it, and goes on (exit status 0). Prints nothing when everything is there.
set -uo pipefail

have_chromium() { [ -x /usr/bin/chromium ]; }
have_mariadb() { [ -x /usr/sbin/mariadbd ] || command -v mariadbd >/dev/null 2>&1; }
have_jdk_and_maven() { command -v mvn >/dev/null 2>&1 && command -v javac >/dev/null 2>&1; }

can_install=0
if [ "$(id -u)" -eq 0 ] && command -v apt-get >/dev/null 2>&1; then
  can_install=1
fi
sudo_prefix=""
[ "$(id -u)" -eq 0 ] || sudo_prefix="sudo "
updated=0

# ensure CHECK WHAT CONSEQUENCE PACKAGE...
ensure() {
  local check=$1 what=$2 consequence=$3
  shift 3
  "$check" && return 0
  local command_line="${sudo_prefix}apt-get install -y --no-install-recommends $*"
  if [ "$can_install" -eq 0 ]; then
    echo "system-deps: no $what ($consequence): install it with \`$command_line\`"
    return 0
  fi
  echo "system-deps: installing $*"
  if [ "$updated" -eq 0 ]; then
    DEBIAN_FRONTEND=noninteractive apt-get update -qq >/dev/null 2>&1 && updated=1
  fi
  if ! DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$@" \
         >/dev/null 2>&1; then
    echo "system-deps: apt-get could not install $* ($consequence): try \`$command_line\`"
  fi
}

ensure have_chromium chromium "the browser tests will be skipped" chromium chromium-driver
ensure have_mariadb mariadb-server "the MySQL metadata tests will be skipped" mariadb-server
ensure have_jdk_and_maven "mvn or javac" "make engines, and so make test, will fail" \
  openjdk-17-jdk-headless maven
exit 0
