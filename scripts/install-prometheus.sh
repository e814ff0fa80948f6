#!/usr/bin/env bash
# Make `promtool` and `prometheus` available under .tools/prometheus/ (git-ignored),
# for `promtool check/test rules` and the tests that scrape a live forwarder.
#
# It never starts a system service: the binaries come out of the Debian package
# `prometheus` with `apt-get download` + `dpkg -x` (no maintainer scripts run). Both
# binaries are static Go builds that need only libc, so they run from any directory.
# Order of attempts:
#   1. already in .tools/prometheus and `--version` works: nothing to do;
#   2. `promtool` and `prometheus` already on the PATH: link them;
#   3. `apt-get download prometheus` (after `apt-get update` if the package is unknown);
#   4. last resort, root only: `apt-get install -y prometheus` with a policy-rc.d that
#      forbids starting services, then link /usr/bin/{promtool,prometheus}.
# Idempotent; safe to run from several processes at once (flock). Prints the binaries'
# paths and versions. Exit 0 on success, 1 when nothing worked (with the reason).
#
# Environment: PROMETHEUS_TOOLS_DIR overrides the target directory.
set -euo pipefail

repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
dest="${PROMETHEUS_TOOLS_DIR:-$repo_root/.tools/prometheus}"
bins=(promtool prometheus)

log() { printf 'install-prometheus: %s\n' "$*" >&2; }

installed() {
    local b
    for b in "${bins[@]}"; do
        [[ -x "$dest/$b" ]] && "$dest/$b" --version >/dev/null 2>&1 || return 1
    done
}

report() {
    local b
    for b in "${bins[@]}"; do
        printf '%s: %s (%s)\n' "$b" "$dest/$b" "$("$dest/$b" --version 2>&1 | head -n 1)"
    done
}

as_root() {
    if [[ "$(id -u)" -eq 0 ]]; then
        "$@"
    elif command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
        sudo -n "$@"
    else
        return 1
    fi
}

from_path() {
    local b p
    for b in "${bins[@]}"; do
        p="$(command -v "$b" 2>/dev/null)" || return 1
        # Not our own links (a previous half-finished run).
        [[ "$(readlink -f "$p")" != "$(readlink -f "$dest/$b" 2>/dev/null)" ]] || return 1
    done
    for b in "${bins[@]}"; do
        ln -sfn "$(readlink -f "$(command -v "$b")")" "$dest/$b"
    done
    log "linked the binaries already on the PATH"
}

download() {
    command -v apt-get >/dev/null 2>&1 || return 1
    local work
    work="$(mktemp -d "$dest/.download.XXXXXX")"
    # apt-get download writes into the current directory; as root it warns that the
    # _apt user cannot write there, which is harmless.
    if ! (cd "$work" && apt-get download -q prometheus >"$work/apt.log" 2>&1); then
        log "apt-get download prometheus failed: $(tail -n 1 "$work/apt.log")"
        if grep -qiE 'unable to locate|no packages found|has no installation candidate' "$work/apt.log" \
            && as_root apt-get update -q >"$work/update.log" 2>&1; then
            log "ran apt-get update; retrying the download"
            (cd "$work" && apt-get download -q prometheus >"$work/apt.log" 2>&1) || {
                log "apt-get download prometheus failed again: $(tail -n 1 "$work/apt.log")"
                rm -rf "$work"
                return 1
            }
        else
            rm -rf "$work"
            return 1
        fi
    fi
    # errexit is off inside a function called from `if`: check each step.
    local b
    dpkg -x "$work"/prometheus_*.deb "$work/root" || { rm -rf "$work"; return 1; }
    for b in "${bins[@]}"; do
        install -m 0755 "$work/root/usr/bin/$b" "$dest/$b.new" || { rm -rf "$work"; return 1; }
        mv -f "$dest/$b.new" "$dest/$b"
    done
    basename "$work"/prometheus_*.deb >"$dest/SOURCE"
    rm -rf "$work"
    log "extracted from $(cat "$dest/SOURCE")"
}

apt_install() {
    command -v apt-get >/dev/null 2>&1 || return 1
    [[ "$(id -u)" -eq 0 ]] || return 1
    local policy=/usr/sbin/policy-rc.d created=0
    if [[ ! -e "$policy" ]]; then
        # Debian's way to keep maintainer scripts from starting services.
        printf '#!/bin/sh\nexit 101\n' >"$policy"
        chmod 0755 "$policy"
        created=1
    fi
    local rc=0
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends prometheus >&2 || rc=$?
    if [[ "$created" -eq 1 ]]; then rm -f "$policy"; fi
    [[ "$rc" -eq 0 ]] || return 1
    # A systemd host may still have enabled the unit: make sure it is not running.
    if command -v systemctl >/dev/null 2>&1 && systemctl is-active --quiet prometheus 2>/dev/null; then
        systemctl stop prometheus || true
    fi
    local b
    for b in "${bins[@]}"; do ln -sfn "/usr/bin/$b" "$dest/$b"; done
    log "installed the Debian package prometheus (service not started)"
}

mkdir -p "$dest"
exec 9>"$dest/.lock"
flock 9

if installed; then
    report
    exit 0
fi

for attempt in from_path download apt_install; do
    if "$attempt" && installed; then
        report
        exit 0
    fi
done

log "could not provide promtool and prometheus in $dest"
log "(needs the Debian package 'prometheus' through apt, or both binaries on the PATH)"
exit 1
