#!/usr/bin/env bash
# buf breaking: protos/ as they are in the work tree against the previous commit, by
# buf.yaml's `breaking` rules (FILE: no field, message, RPC or package removed or renumbered).
# Where HEAD has no parent (a repository's first commit, a shallow clone) there is nothing to
# compare against: it says so and skips this check only.
set -euo pipefail
cd "$(dirname "$0")/.."
buf=.tools/node_modules/.bin/buf
[ -x "$buf" ] || { echo "$buf not found: run scripts/bootstrap.sh --dev" >&2; exit 1; }

if ! previous=$(git rev-parse --verify --quiet 'HEAD~1^{commit}'); then
  why="HEAD has no parent commit"
  [ "$(git rev-parse --is-shallow-repository)" = true ] && why="a shallow clone holds no parent of HEAD (git fetch --unshallow)"
  echo "buf breaking skipped: $why, so there is no previous protos/ to compare against"
  exit 0
fi
# The repository itself, not .git: a worktree's .git is a file naming it.
"$buf" breaking --against "$(git rev-parse --git-common-dir)#ref=$previous"
echo "protos/ keep compatibility with $(git rev-parse --short "$previous") (buf breaking, FILE rules)"
