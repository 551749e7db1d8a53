#!/usr/bin/env bash
# Side by side: tbnet's echo pair, tarpc and tonic, the same shapes in one
# run. Prints a Markdown table (stdout); progress goes to stderr.
#
#   bash benches/peers/run.sh                 # 5 s per row
#   SECS=10 bash benches/peers/run.sh
#   SIZES="64 4096" SHAPES="1x1 4x32 64x4" STACKS="tbnet tarpc tonic" bash benches/peers/run.sh
#
# Builds everything in release mode first (the peers' first build takes a
# few minutes). Every server runs in its own process on 127.0.0.1 and is
# stopped after its row; every client checks every answer byte for byte.
# tbnet's server handles requests on its IO thread (echo_server's default)
# and its client waits with MODE (call, callback or future; default call).
set -euo pipefail
peers="$(cd "$(dirname "$0")" && pwd)"
root="$(cd "$peers/../.." && pwd)"
SECS="${SECS:-5}"
SIZES="${SIZES:-64 4096}"
SHAPES="${SHAPES:-1x1 4x32 64x4}"
STACKS="${STACKS:-tbnet tarpc tonic}"
MODE="${MODE:-call}"

echo "building tbnet's echo pair and the peers (release)" >&2
(cd "$root" && cargo build --quiet --release --example echo_server --example echo_client)
(cd "$peers" && cargo build --quiet --release)
tbnet_bin="$root/target/release/examples"
peers_bin="$peers/target/release"

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

# start_server CMD...: runs it, waits for "listening on ADDR", sets $addr.
start_server() {
    "$@" >"$work/server.out" 2>"$work/server.err" &
    server=$!
    addr=""
    for _ in $(seq 1 600); do
        addr=$(sed -n 's/^listening on //p' "$work/server.out")
        [ -n "$addr" ] && return 0
        kill -0 "$server" 2>/dev/null || break
        sleep 0.05
    done
    echo "server $* did not start:" >&2
    cat "$work/server.err" >&2
    exit 1
}

stop_server() {
    kill "$server" 2>/dev/null || true
    wait "$server" 2>/dev/null || true
    server=""
}

field() { # field NAME JSON
    sed -n "s/.*\"$1\":\"\{0,1\}\([^,\"}]*\).*/\1/p" <<<"$2"
}

echo "| size | shape | stack | req/s | p50 us | p99 us | errors |"
echo "|---:|---:|---|---:|---:|---:|---:|"
for size in $SIZES; do
    for shape in $SHAPES; do
        conns=${shape%x*}
        depth=${shape#*x}
        for stack in $STACKS; do
            echo "$size B ${conns}x${depth} $stack" >&2
            case "$stack" in
                tbnet)
                    start_server "$tbnet_bin/echo_server" --addr 127.0.0.1:0
                    client=("$tbnet_bin/echo_client" --mode "$MODE")
                    ;;
                tarpc)
                    start_server "$peers_bin/tarpc_echo" server --addr 127.0.0.1:0
                    client=("$peers_bin/tarpc_echo" client)
                    ;;
                tonic)
                    start_server "$peers_bin/tonic_echo" server --addr 127.0.0.1:0
                    client=("$peers_bin/tonic_echo" client)
                    ;;
                *)
                    echo "unknown stack $stack" >&2
                    exit 2
                    ;;
            esac
            json=$("${client[@]}" --addr "$addr" --conns "$conns" --depth "$depth" \
                --size "$size" --secs "$SECS" --json 2>/dev/null | tail -1) || true
            stop_server
            if [ -z "$json" ]; then
                echo "| $size B | ${conns}x${depth} | $stack | failed | | | |"
                continue
            fi
            errors=$(( $(field errors "$json") + $(field mismatches "$json") ))
            echo "| $size B | ${conns}x${depth} | $stack | $(field rps "$json") | $(field p50_us "$json") | $(field p99_us "$json") | $errors |"
        done
    done
done
