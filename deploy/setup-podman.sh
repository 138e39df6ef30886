#!/usr/bin/env bash
# Install and configure podman (Debian bookworm's 4.3) so that `make image` and the container test
# (tests/deploy/test_container.py) can build and run slmtune's image on this machine. Idempotent;
# .ci/run calls it. Exits non-zero when podman cannot be made to work (the test then skips).
#
# What it sets up, and why:
# - podman, runc, catatonit (podman's init for pods), debootstrap (the offline base image,
#   deploy/build-image.sh) from apt;
# - /etc/containers/containers.conf.d/50-slmtune.conf: the runc runtime (crun fails on hosts with
#   hybrid cgroups v1/v2) and nofile/nproc limits below this host's hard limits (podman's defaults
#   of 1048576 make runc fail where the host allows fewer).
set -euo pipefail

log() { echo "setup-podman: $*" >&2; }
as_root() {
    if [ "$(id -u)" = 0 ]; then "$@"
    elif command -v sudo >/dev/null && sudo -n true 2>/dev/null; then sudo "$@"
    else log "needs root (or passwordless sudo) for: $*"; return 1
    fi
}

missing=()
command -v podman >/dev/null || missing+=(podman)
command -v runc >/dev/null || missing+=(runc)
[ -x /usr/bin/catatonit ] || [ -x /usr/libexec/podman/catatonit ] || missing+=(catatonit)
command -v debootstrap >/dev/null || [ -x /usr/sbin/debootstrap ] || missing+=(debootstrap)
if [ ${#missing[@]} -gt 0 ]; then
    command -v apt-get >/dev/null || { log "no apt-get: install ${missing[*]} yourself"; exit 1; }
    log "apt-get install ${missing[*]}"
    as_root apt-get update -qq
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
fi

conf=/etc/containers/containers.conf.d/50-slmtune.conf
want='# deploy/setup-podman.sh (slmtune): runc, and ulimits this host allows
[containers]
default_ulimits = ["nofile=16384:16384", "nproc=4096:4096"]

[engine]
runtime = "runc"'
if [ "$(cat "$conf" 2>/dev/null)" != "$want" ]; then
    log "writing $conf"
    as_root mkdir -p "$(dirname "$conf")"
    printf '%s\n' "$want" | as_root tee "$conf" >/dev/null
fi

if ! out=$(podman info --format '{{.Host.OCIRuntime.Name}} {{.Store.GraphDriverName}}' 2>&1); then
    log "podman info fails: $(echo "$out" | tail -1)"
    exit 1
fi
log "podman $(podman version --format '{{.Client.Version}}') works (runtime, storage: $out)"
