# Shared by the benchmarks: builds (or takes HADB_BENCH_BIN), makes a
# /tmp/hadb-bench-* directory removed with every process on exit, and
# start_pair MODE brings up a two-node pair on loopback, a primary, with
# the initial resync done. Sourced, not run; set BENCH (the script name),
# SIZE and RESYNC_TIMEOUT first.
# shellcheck shell=bash

die() { echo "bench/$BENCH: $*" >&2; exit 1; }
say() { echo "== $*" >&2; }

ROOT=$(cd "$(dirname "$0")/../.." && pwd)
cd "$ROOT"

# HADB_BENCH_BIN: measure this binary instead (e.g. the static musl build
# that ships: target/x86_64-unknown-linux-musl/release/hadb).
if [[ -n ${HADB_BENCH_BIN:-} ]]; then
  HADB=$HADB_BENCH_BIN
else
  say "cargo build --release"
  cargo build --release >&2
  HADB=$ROOT/target/release/hadb
fi
[[ -x $HADB ]] || die "$HADB was not built"

D=$(mktemp -d /tmp/hadb-bench-XXXX)

# Every backing file is written in full first, as a real disk is: writes
# into holes of a sparse file cost the filesystem an allocation each (and,
# on kernels with large folios, a walk of the whole folio), which measures
# the host's ext4 rather than hadb or nbdkit.
prefill() {
  truncate -s "$SIZE" "$1"
  local bytes
  bytes=$(stat -c %s "$1")
  dd if=/dev/zero of="$1" bs=1M count=$((bytes / 1048576)) conv=notrunc,fsync status=none
}
PIDS=()
FIO_PID=
cleanup() {
  local rc=$?
  set +e
  [[ -n $FIO_PID ]] && PIDS=("$FIO_PID" "${PIDS[@]}")
  for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null; done
  for pid in "${PIDS[@]}"; do
    for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    kill -KILL "$pid" 2>/dev/null
    wait "$pid" 2>/dev/null
  done
  if [[ $rc -ne 0 ]]; then
    for n in a b; do
      if [[ -s $D/$n.log ]]; then
        echo "--- last lines of $n.log" >&2
        tail -n 30 "$D/$n.log" >&2
      fi
    done
  fi
  rm -rf "$D"
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

hadb() { "$HADB" --config "$D/$1.toml" --cmdline none "${@:2}"; }

# Prints the value of a dotted path in `hadb status --json` of node $1, or
# fails when the daemon does not answer.
status_get() {
  local out
  out=$(hadb "$1" status --json 2>/dev/null) || return 1
  python3 -c '
import json, sys
v = json.loads(sys.argv[1])
for k in sys.argv[2].split("."):
    v = v[k] if isinstance(v, dict) else None
print(json.dumps(v))' "$out" "$2"
}

# wait_for NODE PATH PREDICATE TIMEOUT WHAT: polls until PREDICATE (a python
# expression over `v`) holds for the status value at PATH.
wait_for() {
  local node=$1 path=$2 pred=$3 timeout=$4 what=$5 v="" deadline=$(( ${EPOCHREALTIME/./} + $4 * 1000000 ))
  while true; do
    for pid in "${PIDS[@]}"; do
      kill -0 "$pid" 2>/dev/null || die "a process ($pid) died while waiting for $what"
    done
    if v=$(status_get "$node" "$path") \
      && python3 -c "import json,sys; v=json.loads(sys.argv[1]); sys.exit(0 if ($pred) else 1)" "$v"; then
      return 0
    fi
    (( ${EPOCHREALTIME/./} < deadline )) \
      || die "node $node: no $what after ${timeout}s (last $path = ${v:-<no answer>})"
    sleep 0.2
  done
}


# start_pair MODE (body not indented: it holds a here-document)
start_pair() {
local mode=$1
read -r PORT_A PORT_B < <(python3 -c '
import socket
s = [socket.socket() for _ in range(2)]
for x in s: x.bind(("127.0.0.1", 0))
print(*(x.getsockname()[1] for x in s))')

say "hadb pair in $D (size $SIZE, ports $PORT_A/$PORT_B)"
head -c 32 /dev/urandom > "$D/key"; chmod 600 "$D/key"
for n in a b; do
  prefill "$D/$n.img"
  cat > "$D/$n.toml" <<EOF
cluster = "bench"
node = "$n"
key_file = "$D/key"
state_dir = "$D/$n.state"
[nodes.a]
address = "127.0.0.1"
port = $PORT_A
heartbeat_port = $PORT_A
[nodes.b]
address = "127.0.0.1"
port = $PORT_B
heartbeat_port = $PORT_B
[volume]
device = "$D/$n.img"
mode = "$mode"
nbd_socket = "$D/$n.nbd"
[manager]
maintenance = ${MAINTENANCE:-true}
[control]
socket = "$D/$n.ctl"
EOF
  hadb "$n" volume create-md >"$D/$n.create-md" 2>&1 \
    || { cat "$D/$n.create-md" >&2; die "volume create-md on $n failed"; }
  # Not through the hadb function: $! must be the daemon itself, not a
  # subshell, so that cleanup's kill reaches it.
  "$HADB" --config "$D/$n.toml" --cmdline none run </dev/null >/dev/null 2>"$D/$n.log" &
  PIDS+=($!)
done

wait_for a volume.peer 'v is not None' 20 "peer connection"
hadb a volume primary >&2 || die "volume primary on a failed"
t0=$SECONDS
say "initial resync of $SIZE to b"
wait_for a volume.peer_up_to_date 'v is True' "$RESYNC_TIMEOUT" "up-to-date peer (initial resync)"
RESYNC_S=$((SECONDS - t0))
DATA_SIZE=$(status_get a volume.data_size)
[[ $DATA_SIZE =~ ^[0-9]+$ ]] || die "status has no volume.data_size ($DATA_SIZE)"

}
