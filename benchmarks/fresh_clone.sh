#!/usr/bin/env bash
# The fresh-clone times: `make demo` and `make test`, each in its own fresh clone of this repository's commit (its
# own .venv, installed from scratch; pip's and the kit's download caches as they are), timed by /usr/bin/time -v.
# Writes docs/measured/fresh-clone-<cpu kind>.md: wall time, peak memory, what each took its time for, the CPU and
# the commit; the docs link to that page. Only committed files are cloned.
#
#   bash benchmarks/fresh_clone.sh            # both, make demo first (20-45 minutes on 2 cores)
#   bash benchmarks/fresh_clone.sh test       # one of them (the page then holds that one only)
#
# Run it on a quiet machine: anything else running on it lengthens both times.
set -euo pipefail

repo=$(git -C "$(dirname "$0")/.." rev-parse --show-toplevel)
targets=("$@")
[ ${#targets[@]} -gt 0 ] || targets=(demo test)
for target in "${targets[@]}"; do
  case $target in demo | test) ;; *) echo "fresh_clone.sh: make demo or make test, not '$target'" >&2; exit 2 ;; esac
done
[ -x /usr/bin/time ] || { echo "fresh_clone.sh needs GNU time at /usr/bin/time (Debian: apt-get install time)" >&2; exit 2; }

python=${PYTHON:-python3}
kind=$("$python" "$repo/benchmarks/table.py" --cpu-kind)
model=$(sed -n 's/^model name[[:space:]]*: //p' /proc/cpuinfo 2>/dev/null | head -n 1)
commit=$(git -C "$repo" rev-parse --short HEAD)
work=$(mktemp -d)
chmod 755 "$work"  # as a checkout is: the tests that drop their privileges still read the kit in the clone
trap 'rm -rf "$work"' EXIT
rows=()
notebooks=""
stages=""
failed=0

minutes() {  # "h:mm:ss.ss" or "m:ss.ss" -> minutes, one decimal
  awk -F: '{ s = 0; for (i = 1; i <= NF; i++) s = s * 60 + $i; printf "%.1f", s / 60 }' <<<"$1"
}

for target in "${targets[@]}"; do
  clone=$work/$target/humpback-nb
  mkdir -p "$work/$target"
  git clone --quiet "$repo" "$clone"
  echo "make $target in a fresh clone of $commit ($clone)" >&2
  status=0
  (cd "$clone" && /usr/bin/time -v -o "$work/$target/time.txt" make "$target" PYTHON="$python") \
    >"$work/$target/log.txt" 2>&1 || status=$?
  wall=$(awk '/Elapsed \(wall clock\)/ { print $NF }' "$work/$target/time.txt")
  rss=$(sed -n 's/.*Maximum resident set size (kbytes): //p' "$work/$target/time.txt")
  peak=$(awk '{ printf "%.1f GiB", $1 / 1048576 }' <<<"${rss:-0}")
  part=""
  if [ "$target" = test ]; then
    # pytest's own summary line: what passed, and the seconds of the tests alone
    part=$(grep -E '^=*.*[0-9]+ (passed|failed)' "$work/$target/log.txt" | tail -n 1 | sed 's/^=* *//; s/ *=*$//' || true)
  elif [ -x "$clone/.venv/bin/python" ]; then
    # the stages' own seconds (each stage's manifest), and each notebook's (papermill's, in the executed copies)
    stages=$("$clone/.venv/bin/python" - "$clone/runs" <<'EOF'
import sys
from pathlib import Path

import yaml

# every stage's own seconds, the run's and its follow-ups' (a stage a follow-up linked from the run is not counted
# twice), in the order the stages finished; the first line is their sum, for the table of the two commands
rows = []
for run in sorted(Path(sys.argv[1]).glob("demo*")):
    for path in (run / "stages").glob("*.yaml"):
        manifest = yaml.safe_load(path.read_text()) or {}
        if manifest.get("seconds") and "linked_from" not in manifest:
            rows.append((path.stat().st_mtime, run.name, path.stem, manifest["seconds"]))
if rows:
    total = sum(s for *_, s in rows)
    own = sum(s for _, run, _, s in rows if run == "demo")
    print(f"the stages {total / 60:.1f} min (the run's {own / 60:.1f}, its follow-ups' {(total - own) / 60:.1f})")
    print("| stage | seconds | share |\n|---|---:|---:|")
    for _, run, name, s in sorted(rows):
        print(f"| `{run}/{name}` | {s:.0f} | {s / total:.0%} |")
    print(f"| all | {total:.0f} ({total / 60:.1f} min) | |")
EOF
)
    part=$(head -n 1 <<<"$stages")
    stages=$(tail -n +2 <<<"$stages")
    notebooks=$("$clone/.venv/bin/python" - "$clone/runs/demo/notebooks" <<'EOF'
import json
import sys
from pathlib import Path

rows = []
for path in sorted(Path(sys.argv[1]).glob("*.ipynb")):
    duration = json.loads(path.read_text()).get("metadata", {}).get("papermill", {}).get("duration")
    if duration is not None:
        rows.append((path.stem, duration))
if rows:
    print("| notebook | seconds |\n|---|---:|")
    for name, duration in rows:
        print(f"| `{name}` | {duration:.3g} |" if duration < 100 else f"| `{name}` | {duration:.0f} |")
    total = sum(d for _, d in rows)
    print(f"| all | {total:.0f} ({total / 60:.0f} min) |")
EOF
)
  fi
  [ "$status" = 0 ] || { part="failed: exit status $status${part:+; $part}"; failed=1; }
  rows+=("| \`make $target\` | $(minutes "$wall") min | $peak | ${part:-} |")
  if [ "$status" != 0 ]; then
    tail -n 20 "$work/$target/log.txt" >&2  # the clone and its log are deleted at the end
  fi
done

page=$repo/docs/measured/fresh-clone-$kind.md
mkdir -p "$repo/docs/measured"
{
  echo "<!-- written by benchmarks/fresh_clone.sh; the script rewrites it -->"
  echo "# Fresh clone on $kind"
  echo
  echo "Written by \`bash benchmarks/fresh_clone.sh\` on ${model:-an unknown CPU} ($(nproc) CPUs), at commit $commit,"
  echo "$(date -u +%Y-%m-%dT%H:%M:%SZ): each command in its own fresh clone of that commit, installing its own \`.venv\`"
  echo "(pip's and the kit's download caches as they were), timed by \`/usr/bin/time -v\`. Peak memory is the largest"
  echo "resident set of one process. The script on a machine of this kind rewrites this file."
  echo
  echo "| command | wall time | peak memory | of it |"
  echo "|---|---:|---:|---|"
  printf '%s\n' "${rows[@]}"
  if [ -n "$notebooks" ]; then
    echo
    echo "\`make demo\`'s notebooks from scratch (papermill's times in the executed notebooks):"
    echo
    echo "$notebooks"
  fi
  if [ -n "$stages" ]; then
    echo
    echo "\`make demo\`'s stages, the run's and its follow-ups' (each stage's manifest):"
    echo
    echo "$stages"
  fi
} >"$page.tmp"
mv "$page.tmp" "$page"
echo "$page"
exit "$failed"
