"""Print docs/reliability.md's drill tables from the drills' own output (build/drills.jsonl): the latest row
of each drill. Columns a drill did not measure show "—"."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

HEAD = ("| drill | jobs | lost or unknown | wrong answers | answered twice (worker logs) | started again "
        "| time to recover | drill time |")


def _num(row: dict[str, Any], *keys: str) -> str:
    values = [row[k] for k in keys if k in row]
    return str(sum(values)) if values else "—"


def _seconds(row: dict[str, Any], key: str) -> str:
    return f"{row[key]} s" if key in row else "—"


def _details(r: dict[str, Any]) -> str:
    """What the drill's name does not say: the kills, the codes, what was at risk."""
    parts = []
    if r.get("kills"):
        kills = r["kills"]
        landed = [k for k in kills if k["killed_mid_job"]]
        parts.append(f"{len(landed)} kills, each on jobs the fresh process was running ("
                     + ", ".join(str(k["killed_mid_job"]) for k in landed) + " jobs; "
                     + "/".join(f"{k['after_ready_s']:g}" for k in landed) + " s after its own heartbeat)")
    if "codes" in r:
        parts.append(", ".join(f"`{c}`" for c in r["codes"]))
    if "code" in r:
        parts.append(f"`{r['code']}` after {r['attempts']} starts")
    if "max_batch" in r:
        parts.append(f"batches split down to {r['max_batch']}")
    if "submit_during_outage" in r:
        parts.append(f"submit meanwhile: `{r['submit_during_outage']}`, retryable")
    if "given_back" in r:
        parts.append(f"{r['given_back']} jobs given back after a {r['outage_s']} s outage")
    if "handed_out_last_second" in r:
        parts.append(f"{r['handed_out_last_second']} ids handed out in the last second before the kill, "
                     f"{r['refused_submits']} submits refused meanwhile")
    if "done_before_stop" in r:
        parts.append(f"{r['done_before_stop']} done before it stopped")
    return f" ({'; '.join(parts)})" if parts else ""


def main(path: Path = Path("build/drills.jsonl")) -> None:
    latest: dict[str, dict[str, Any]] = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        row = json.loads(line)
        latest[row["drill"]] = row
    corpus = latest.pop("bad-input corpus", None)
    accepted = latest.pop("formats that must work", None)
    other = {name: r for name, r in latest.items() if "jobs" not in r}
    print(HEAD)
    print("|---|---|---|---|---|---|---|---|")
    for name, r in latest.items():
        if name in other:
            continue
        print(f"| {name}{_details(r)} | {r['jobs']} | {_num(r, 'lost', 'unknown')} | {_num(r, 'wrong')} "
              f"| {_num(r, 'run_twice')} | {_num(r, 'recomputed')} | {_seconds(r, 'recover_s')} "
              f"| {_seconds(r, 'duration_s')} |")
    if other:
        print("\nDrills without jobs (the gateway's connection limits):\n")
        for name, r in other.items():
            print(f"- {name}: " + ", ".join(f"{k} {v}" for k, v in r.items() if k != "drill"))
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
