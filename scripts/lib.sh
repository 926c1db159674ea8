# Shared helpers for meshkeep's scripts: stage timing and tool paths. Source, don't run.

# Tools installed with pip (cargo-zigbuild, ziglang) land in the interpreter's scripts directory.
PIP_SCRIPTS="$(python3 -c 'import sysconfig; print(sysconfig.get_path("scripts"))' 2>/dev/null || true)"
if [ -n "$PIP_SCRIPTS" ]; then export PATH="$PIP_SCRIPTS:$PATH"; fi
export PATH="$HOME/.cargo/bin:$HOME/.local/bin:$PATH"

ARM_TARGETS=(aarch64-unknown-linux-musl armv7-unknown-linux-musleabihf)
declare -A QEMU_FOR=([aarch64-unknown-linux-musl]=qemu-aarch64-static [armv7-unknown-linux-musleabihf]=qemu-arm-static)

# bench_executable NAME: builds benches/NAME.rs (release) and prints the executable's path.
bench_executable() {
    cargo bench --locked --bench "$1" --no-run --message-format=json \
        | python3 -c 'import json, sys
for line in sys.stdin:
    m = json.loads(line)
    if m.get("reason") == "compiler-artifact" and m["target"]["kind"] == ["bench"] and m.get("executable"):
        print(m["executable"])'
}

STAGE_LOG=()

# stage NAME COMMAND...: runs a command, printing how long it took; stops the run on failure.
stage() {
    local name=$1; shift
    local start=$SECONDS
    echo
    echo "==> $name: $* ($(df -h --output=avail . | tail -1 | tr -d ' ') free on disk)"
    if "$@"; then
        STAGE_LOG+=("$(printf '%-16s %5ss  ok' "$name" $((SECONDS - start)))")
        echo "<== $name: ok in $((SECONDS - start))s"
    else
        local rc=$?
        STAGE_LOG+=("$(printf '%-16s %5ss  FAILED (exit %s)' "$name" $((SECONDS - start)) "$rc")")
        echo "<== $name: FAILED (exit $rc) after $((SECONDS - start))s"
        stage_summary
        exit "$rc"
    fi
}

stage_summary() {
    echo
    echo "stage            time  result"
    printf '%s\n' "${STAGE_LOG[@]}"
}

# free_port: prints a loopback TCP port that was free a moment ago.
free_port() {
    python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'
}

# apt_install PACKAGE...: installs the Debian packages that are not installed yet.
apt_install() {
    local missing=() package
    for package in "$@"; do
        dpkg-query -W -f='${Status}' "$package" 2>/dev/null | grep -q "install ok installed" || missing+=("$package")
    done
    if [ ${#missing[@]} -gt 0 ]; then
        echo "apt: installing ${missing[*]}"
        local sudo=""; [ "$(id -u)" -eq 0 ] || sudo=sudo
        $sudo apt-get update -qq
        DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}"
    fi
}
