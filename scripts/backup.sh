#!/usr/bin/env bash
# Cron wrapper around `sds backup`: one verified archive per run, the newest N kept.
#
#   scripts/backup.sh --out DIR [--keep N]
#   scripts/backup.sh --help
#
# Options:
#   --out DIR    where the archives go (default: $SDS_BACKUP_DIR); the user running
#                the backup must own it (install -d -o sds -g sds -m 0700 DIR)
#   --keep N     keep the newest N sds-backup-* archives of DIR (default:
#                $SDS_BACKUP_KEEP, else 7); pruned only after a verified run
#
# Configuration comes from the environment like every sds command:
#   SDS_PERSIST_DIR   store files to back up (required)
#   SDS_BACKUP_DIR    default for --out
#   SDS_BACKUP_KEEP   default for --keep
#   SDS_BIN           the sds command (default: sds on PATH)
#
# `sds backup --keep N` does the work (archive 0600, verify, prune, remove what a
# killed run left); this wrapper adds timestamped (UTC) log lines: progress on
# stdout, failures on stderr. Exit status 0 on success, 1 on a failed backup,
# 2 on bad options. Cron mails whatever a job prints, so send stdout to the
# journal (| logger -t sds-backup) or /dev/null and leave stderr to cron: only
# failures are mailed.
#
# Example /etc/cron.d line (03:15 every night, as the service user):
#   15 3 * * * sds SDS_PERSIST_DIR=/var/lib/sds /opt/sds/scripts/backup.sh --out /var/backups/sds --keep 14 | logger -t sds-backup
set -euo pipefail

out="${SDS_BACKUP_DIR:-}"
keep="${SDS_BACKUP_KEEP:-7}"
sds="${SDS_BIN:-sds}"

stamp() { date -u +%Y-%m-%dT%H:%M:%SZ; }
log() { printf '%s backup: %s\n' "$(stamp)" "$*"; }
error() { printf '%s backup: %s\n' "$(stamp)" "$*" >&2; }
usage() {
    # The leading comment block of this file, without the shebang and the '# '.
    awk 'NR == 1 { next } /^#/ { sub(/^# ?/, ""); print; next } { exit }' "$0"
    exit 0
}
need_value() { if [[ $# -lt 2 || -z "$2" ]]; then error "$1 needs a value"; exit 2; fi; }

while [[ $# -gt 0 ]]; do
    case "$1" in
        --out) need_value "$@"; out="$2"; shift 2 ;;
        --out=*) out="${1#--out=}"; shift ;;
        --keep) need_value "$@"; keep="$2"; shift 2 ;;
        --keep=*) keep="${1#--keep=}"; shift ;;
        -h|--help) usage ;;
        *) error "unknown option: $1 (see --help)"; exit 2 ;;
    esac
done

if [[ -z "$out" ]]; then error "--out DIR (or SDS_BACKUP_DIR) is required"; exit 2; fi
if ! [[ "$keep" =~ ^[1-9][0-9]*$ ]]; then error "--keep must be a whole number >= 1, not '$keep'"; exit 2; fi

log "starting: ${SDS_PERSIST_DIR:-<SDS_PERSIST_DIR unset>} -> $out"
if ! result="$("$sds" backup --out "$out" --keep "$keep" --json)"; then
    error "FAILED: sds backup exited non-zero; old archives kept"
    exit 1
fi
archive="$(printf '%s\n' "$result" | grep -o '"archive": "[^"]*"' | head -n 1 | cut -d'"' -f4)"
if [[ -z "$archive" || ! -f "$archive" ]]; then
    error "FAILED: could not find the archive in the output of sds backup"
    exit 1
fi
log "wrote and verified $archive ($(du -h "$archive" | cut -f1))"
# grep exits 1 when a list is empty: that is no failure.
leftovers="$(printf '%s\n' "$result" | sed -n '/"removed_leftovers": \[/,/\]/p' | grep -o '"\.sds-backup-[^"]*"' || true)"
pruned="$(printf '%s\n' "$result" | sed -n '/"pruned": \[/,/\]/p' | grep -o '"[^"]*sds-backup-[^"]*"' || true)"
while read -r name; do
    if [[ -n "$name" ]]; then log "removed ${name//\"/} left by an interrupted run"; fi
done <<<"$leftovers"
while read -r path; do
    path="${path//\"/}"
    if [[ -n "$path" ]]; then log "pruned ${path##*/}"; fi
done <<<"$pruned"
kept=$(find "$out" -maxdepth 1 -type f -name 'sds-backup-*.tar.gz' | wc -l)
log "done: $kept archive(s) in $out"
