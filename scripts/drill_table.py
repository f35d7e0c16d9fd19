"""Print the README's reliability tables from the drills' own output (build/drills.jsonl)."""

from __future__ import annotations

import json
import sys
from pathlib import Path


def main(path: Path = Path("build/drills.jsonl")) -> None:
    latest: dict[str, dict] = {}  # type: ignore[type-arg]
    for line in path.read_text(encoding="utf-8").splitlines():
        row = json.loads(line)
        latest[row["drill"]] = row
    print("| drill | jobs | lost | duplicated results | run twice | time to recover |")
    print("|---|---|---|---|---|---|")
    corpus = accepted = None
    for name, r in latest.items():
        if name == "bad-input corpus":
            corpus = r
            continue
        if name == "formats that must work":
            accepted = r
            continue
        extra = ""
        if "codes" in r:
            extra = " (" + ", ".join(f"`{c}`" for c in r["codes"]) + ")"
        if "max_batch" in r:
            extra = f" (batches split down to {r['max_batch']})"
        if "submit_during_outage" in r:
            extra = f" (submit meanwhile: `{r['submit_during_outage']}`, retryable)"
        recover = f"{r['recover_s']} s" if "recover_s" in r else "—"
        print(f"| {name}{extra} | {r['jobs']} | {r['lost']} | {r['duplicated']} | {r.get('recomputed', 0)} | {recover} |")
    if corpus:
        print(f"\nBad-input corpus: {corpus['cases']} cases, each refused with its code; {corpus['stored']} "
              f"stored, {corpus['queued']} queued.\n")
        print("| input | code |\n|---|---|")
        for case, code in corpus["table"].items():
            print(f"| {case} | `{code}` |")
    if accepted:
        print("\nAnswered normally: " + ", ".join(accepted["table"]) + ".")


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else Path("build/drills.jsonl"))
