#!/usr/bin/env bash
# Build slmtune's container image (`make image`): localhost/slmtune:cpu by default.
#
#   deploy/build-image.sh                    # CPU image, podman (or docker when podman is absent)
#   VARIANT=cuda deploy/build-image.sh       # deploy/Containerfile.cuda -> localhost/slmtune:cuda
#   IMAGE=registry.example.com/slmtune:cpu BASE_IMAGE=python:3.11-slim-bookworm deploy/build-image.sh
#
# With podman, for machines without a container registry: the base image
# (localhost/debian-minbase:bookworm) is made here once with debootstrap from the Debian mirror
# apt uses, and pip inside the build sees the host's pip configuration: its CA bundle, its local
# wheel folders and file:// indexes (mounted read-only with `podman build -v` under
# /run/slmtune-build; only their empty mount points stay in the image). docker (no `build -v`)
# builds from a registry base (debian:bookworm-slim) and the public indexes.
# Podman itself: deploy/setup-podman.sh.
set -euo pipefail
cd "$(dirname "$0")/.."

VARIANT=${VARIANT:-cpu}
IMAGE=${IMAGE:-localhost/slmtune:$VARIANT}
CONTAINERFILE=deploy/Containerfile
[ "$VARIANT" = cpu ] || CONTAINERFILE=deploy/Containerfile.$VARIANT
MINBASE=localhost/debian-minbase:bookworm

log() { echo "build-image: $*" >&2; }

engine=${CONTAINER_ENGINE:-}
if [ -z "$engine" ]; then
    if command -v podman >/dev/null && podman info >/dev/null 2>&1; then
        engine=podman
    elif command -v docker >/dev/null && docker info >/dev/null 2>&1; then
        engine=docker
    else
        log "no working container engine: podman (deploy/setup-podman.sh installs it) or docker with a daemon"
        exit 3
    fi
fi

as_root() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }

# The mirror of the host's Debian sources (deb822 URIs: or one-line `deb URL bookworm ...`).
debian_mirror() {  # $1: debian or debian-security
    local url
    url=$(grep -hsE '^(URIs:|deb )' /etc/apt/sources.list /etc/apt/sources.list.d/*.list /etc/apt/sources.list.d/*.sources |
          grep -oE "(https?|file)://[^ ]+/$1/?( |$)" | head -1 | tr -d ' ') || true
    echo "${url:-http://deb.debian.org/$1}"
}

minbase_rootfs() {  # $1: an empty folder -> a Debian bookworm minbase root file system there
    local dir=$1 mirror security
    mirror=$(debian_mirror debian)
    security=$(debian_mirror debian-security)
    log "debootstrap --variant=minbase bookworm from $mirror"
    as_root debootstrap --variant=minbase bookworm "$dir" "$mirror" >"$dir.log" 2>&1 ||
        { tail -5 "$dir.log" >&2; return 1; }
    as_root sh -c "rm -f '$dir/etc/apt/sources.list'; cat > '$dir/etc/apt/sources.list.d/debian.sources'" <<EOF || return 1
Types: deb
URIs: $mirror
Suites: bookworm bookworm-updates
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg

Types: deb
URIs: $security
Suites: bookworm-security
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
EOF
    as_root sh -c "cd '$dir' && rm -rf var/cache/apt/archives/*.deb var/cache/apt/*.bin var/lib/apt/lists/* var/log/*.log"
}

make_minbase() {  # the base image $MINBASE, made offline: debootstrap from the host's Debian mirror
    command -v debootstrap >/dev/null || as_root apt-get install -y -qq debootstrap >/dev/null || return 1
    local dir ok=0
    dir=$(mktemp -d /var/tmp/slmtune-minbase.XXXXXX) || return 1
    if minbase_rootfs "$dir" &&
       as_root tar -C "$dir" -c . | podman import --change 'CMD ["/bin/bash"]' - "$MINBASE" >/dev/null; then
        log "imported $MINBASE"
        ok=1
    fi
    as_root rm -rf "$dir" "$dir.log"
    [ "$ok" = 1 ]
}

args=(-f "$CONTAINERFILE" -t "$IMAGE")
[ -n "${BASE_IMAGE:-}" ] && args+=(--build-arg "BASE_IMAGE=$BASE_IMAGE")

if [ "$engine" = podman ]; then
    if [ "$VARIANT" = cpu ] && [ "${BASE_IMAGE:-$MINBASE}" = "$MINBASE" ] && ! podman image exists "$MINBASE"; then
        # exit 4: no base image (the container test skips on it, as on 3: no container engine)
        make_minbase || { log "could not make $MINBASE with debootstrap"; exit 4; }
    fi
    # The host's pip configuration (files and PIP_* variables, as `pip config list` shows them),
    # turned into a pip.conf for the build plus the read-only mounts it needs.
    build_dir=$(mktemp -d /tmp/slmtune-build.XXXXXX)
    trap 'rm -rf "$build_dir"' EXIT
    python3 - "$build_dir" "$VARIANT" "${TORCH_VERSION:-2.13.0}" > "$build_dir/args" <<'PY'
import glob, os, subprocess, sys
from urllib.parse import urlparse

out, variant, torch_version = sys.argv[1], sys.argv[2], sys.argv[3]
conf = {}
try:
    listing = subprocess.run([sys.executable, "-m", "pip", "config", "list"], capture_output=True, text=True).stdout
except OSError:
    listing = ""
for line in listing.splitlines():  # files first, then :env: entries (they take precedence)
    key, _, value = line.partition("=")
    conf.setdefault(key.split(".", 1)[-1], {})[key.startswith(":env:")] = value.strip("'\"")
conf = {k: v.get(True, v.get(False)) for k, v in conf.items()}

mounts, cfg = [], {}
cert = conf.get("cert") or ("/etc/ssl/certs/ca-certificates.crt" if os.path.exists("/etc/ssl/certs/ca-certificates.crt") else None)
if cert and os.path.isfile(cert):
    mounts.append(f"{os.path.realpath(cert)}:/run/slmtune-build/ca.crt:ro")
    cfg["cert"] = "/run/slmtune-build/ca.crt"

HOST = "/run/slmtune-build/host"  # the host's local folders appear under here, at their own paths

def local(entry):
    """A local folder an index or find-links entry points at is mounted read-only (a PEP 503
    "simple" index with its parent: its pages link to ../../files); the entry as the build sees it."""
    path = urlparse(entry).path if entry.startswith("file:") else (entry if entry.startswith("/") else None)
    if not path or not os.path.exists(path):
        return entry, None
    root = os.path.dirname(path.rstrip("/")) if os.path.basename(path.rstrip("/")) == "simple" else path
    mounts.append(f"{root}:{HOST}{root}:ro")
    return (f"file://{HOST}{path}" if entry.startswith("file:") else HOST + path), path

wheel_dirs = []
for key in ("index-url", "extra-index-url", "find-links"):
    entries = []
    for e in (conf.get(key) or "").split():
        seen, path = local(e)
        entries.append(seen)
        if key == "find-links" and path and os.path.isdir(path):
            wheel_dirs.append(path)
    if entries:
        cfg[key] = " ".join(entries)
timeout = conf.get("default-timeout") or conf.get("timeout")
if timeout:
    cfg["timeout"] = timeout
with open(os.path.join(out, "pip.conf"), "w") as f:
    f.write("[global]\n" + "".join(f"{k} = {v}\n" for k, v in cfg.items()))
args = ["-v", f"{out}/pip.conf:/run/slmtune-build/pip.conf:ro"]
for m in dict.fromkeys(mounts):
    args += ["-v", m]
if variant == "cpu" and any(glob.glob(os.path.join(d, f"torch-{torch_version}+cpu-cp311-*.whl")) for d in wheel_dirs):
    args += ["--build-arg", "TORCH_INDEX_URL="]  # the CPU wheel is local: no download.pytorch.org
print("\n".join(args))
PY
    mapfile -t extra < "$build_dir/args"
    args+=("${extra[@]}")
    log "pip configuration for the build: $(tr '\n' ';' < "$build_dir/pip.conf")"
elif [ -z "${BASE_IMAGE:-}" ] && [ "$VARIANT" = cpu ]; then
    args+=(--build-arg BASE_IMAGE=debian:bookworm-slim)  # no offline base with docker
fi

log "$engine build ${args[*]} ."
start=$(date +%s)
"$engine" build "${args[@]}" .
log "built $IMAGE in $(( $(date +%s) - start )) s ($("$engine" image inspect --format '{{.Size}}' "$IMAGE" | awk '{printf "%.0f MB", $1/1e6}'))"
