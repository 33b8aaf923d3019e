#!/usr/bin/env bash
# Cron wrapper around `sds backup`: one verified archive per run, the newest N kept.
#
#   scripts/backup.sh --out /var/backups/sds [--keep 7]
#
# Configuration comes from the environment like every sds command:
#   SDS_PERSIST_DIR   store files to back up (required)
#   SDS_BACKUP_DIR    default for --out
#   SDS_BACKUP_KEEP   default for --keep (7)
#   SDS_BIN           the sds command (default: sds on PATH)
# Log lines are timestamped (UTC) on stderr; exit status is non-zero on any
# failure so cron mails it. Old archives are pruned only after a good run.
#
# Example crontab line (03:15 every night):
#   15 3 * * * sds SDS_PERSIST_DIR=/var/lib/sds /opt/sds/scripts/backup.sh --out /var/backups/sds --keep 14
set -euo pipefail

out="${SDS_BACKUP_DIR:-}"
keep="${SDS_BACKUP_KEEP:-7}"
sds="${SDS_BIN:-sds}"

log() { printf '%s backup: %s\n' "$(date -u +%Y-%m-%dT%H:%M:%SZ)" "$*" >&2; }
usage() { sed -n '2,14p' "$0" | sed 's/^# \{0,1\}//' >&2; exit 2; }

while [[ $# -gt 0 ]]; do
    case "$1" in
        --out) out="${2:-}"; shift 2 || usage ;;
        --out=*) out="${1#--out=}"; shift ;;
        --keep) keep="${2:-}"; shift 2 || usage ;;
        --keep=*) keep="${1#--keep=}"; shift ;;
        -h|--help) usage ;;
        *) log "unknown option: $1"; exit 2 ;;
    esac
done

if [[ -z "$out" ]]; then log "--out DIR (or SDS_BACKUP_DIR) is required"; exit 2; fi
if ! [[ "$keep" =~ ^[1-9][0-9]*$ ]]; then log "--keep must be a whole number >= 1, not '$keep'"; exit 2; fi

log "starting: ${SDS_PERSIST_DIR:-<SDS_PERSIST_DIR unset>} -> $out"
if ! archive_json="$("$sds" backup --out "$out" --json)"; then
    log "FAILED: sds backup exited non-zero; old archives kept"
    exit 1
fi
archive="$(printf '%s\n' "$archive_json" | grep -o '"archive": "[^"]*"' | head -n 1 | cut -d'"' -f4)"
if [[ -z "$archive" || ! -f "$archive" ]]; then
    log "FAILED: could not find the archive in the output of sds backup"
    exit 1
fi
if ! "$sds" backup verify "$archive" --json >/dev/null; then
    log "FAILED: $archive does not verify; old archives kept"
    exit 1
fi
log "wrote and verified $archive ($(du -h "$archive" | cut -f1))"

mapfile -t archives < <(find "$out" -maxdepth 1 -type f -name 'sds-backup-*.tar.gz' -printf '%f\n' | sort)
excess=$(( ${#archives[@]} - keep ))
for (( i = 0; i < excess; i++ )); do
    rm -f -- "$out/${archives[$i]}"
    log "pruned ${archives[$i]}"
done
log "done: $(( ${#archives[@]} - (excess > 0 ? excess : 0) )) archive(s) kept in $out"
