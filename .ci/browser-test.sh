#!/usr/bin/env bash
# The status dashboard in a real browser: starts echo_server with --status,
# sends it some traffic with echo_client, renders `GET /` in headless
# Chromium (letting the page's script poll /status in virtual time), and
# checks the rendered DOM shows the per-code row with a non-zero count.
#
#   bash .ci/browser-test.sh                     # the check
#   SCREENSHOT=docs/dashboard.png bash .ci/browser-test.sh   # and a picture
#
# Installs Debian's chromium when it is missing (CI runs as root).
set -euo pipefail
cd "$(dirname "$0")/.."

if ! command -v chromium >/dev/null 2>&1; then
    (apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y chromium) >/dev/null
fi

cargo build --quiet --example echo_server --example echo_client
examples=target/debug/examples
work=$(mktemp -d)
server=""
cleanup() {
    if [ -n "$server" ]; then
        kill "$server" 2>/dev/null || true
        wait "$server" 2>/dev/null || true
    fi
    rm -rf "$work"
}
trap cleanup EXIT

"$examples/echo_server" --addr 127.0.0.1:0 --workers 2 --status >"$work/server.log" 2>&1 &
server=$!
addr=""
for _ in $(seq 1 400); do
    addr=$(sed -n 's/^listening on //p' "$work/server.log")
    [ -n "$addr" ] && break
    kill -0 "$server" 2>/dev/null || break
    sleep 0.05
done
if [ -z "$addr" ]; then
    echo "browser test: echo_server did not start" >&2
    cat "$work/server.log" >&2
    exit 1
fi

"$examples/echo_client" --addr "$addr" --conns 2 --depth 4 --size 64 --secs 1 >/dev/null 2>&1

chrome() {
    timeout 120 chromium --headless --no-sandbox --disable-gpu --disable-quic --no-first-run \
        --disable-background-networking --disable-component-update --disable-sync \
        --user-data-dir="$(mktemp -d -p "$work")" --virtual-time-budget=5000 "$@" 2>"$work/chromium.log"
}

chrome --dump-dom "http://$addr/" >"$work/dom.html" || {
    echo "browser test: chromium failed" >&2
    cat "$work/chromium.log" >&2
    exit 1
}
row='<tr class="code-row" data-side="server" data-pcode="0"><td class="side">server</td><td class="pcode">0</td><td class="requests">[1-9][0-9]*</td>'
if ! grep -Eq "$row" "$work/dom.html"; then
    echo "browser test: no server row for packet code 0 with a non-zero count in the rendered page:" >&2
    cat "$work/dom.html" >&2
    exit 1
fi
echo "browser test: the dashboard rendered the per-code row ($(grep -Eo "$row" "$work/dom.html" | grep -Eo '[0-9]+</td>$' | tr -d '</td>') requests)"

if [ -n "${SCREENSHOT:-}" ]; then
    # Traffic while the page polls, so the chart has something to draw.
    "$examples/echo_client" --addr "$addr" --conns 4 --depth 8 --size 64 --secs 25 >/dev/null 2>&1 &
    load=$!
    chrome --virtual-time-budget=20000 --window-size=1200,900 --screenshot="$PWD/$SCREENSHOT" "http://$addr/"
    wait "$load"
    echo "browser test: screenshot in $SCREENSHOT"
fi
