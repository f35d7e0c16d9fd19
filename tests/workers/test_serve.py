"""``tuwen serve`` as a newcomer runs it: one command, then docs/openai.md's streamed snippet as written gets an
answer that names the picture's fact; Ctrl-C stops everything and leaves no process behind."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tuwen.pipeline.gateway.apikeys import KeyStore
from tuwen.pipeline.jobs import connect
from tuwen.pipeline.localredis import LocalRedis
from tuwen.workers.demo.samples import load_samples
from tuwen.workers.demo.serve import OWNER, _api_key
from tests.cli import as_at_a_terminal
from tests.gateway.conftest import run_doc_snippet
from tests.ports import free_port

pytestmark = [pytest.mark.integration]

REPO = Path(__file__).resolve().parents[2]


def children_of(pid: int) -> set[int]:
    """Every live descendant of ``pid`` (from /proc: no psutil needed)."""
    found: set[int] = set()
    parents = {pid}
    while parents:
        nxt = set()
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) in parents and fields[0] != "Z":
                nxt.add(int(entry.name))
        found |= nxt
        parents = nxt - parents
    return found


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def openai_snippet() -> str:
    """docs/openai.md's first SDK snippet and its streaming one, one after the other, as a reader pastes them."""
    doc = (REPO / "docs" / "openai.md").read_text(encoding="utf-8")
    blocks = re.findall(r"```python\n(.*?)```", doc[doc.index("## Python: the official SDK"):], re.S)
    assert "stream=True" in blocks[1], blocks[1]
    return blocks[0] + "\n" + blocks[1]


@pytest.mark.timeout(300)
def test_serve_then_the_documented_snippet_streams_an_answer_and_ctrl_c_stops_everything(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Given a user with no tuwen data yet (their own XDG data directory) and no TUWEN_* settings
    data = tmp_path / "data"
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("TUWEN_")}, "XDG_DATA_HOME": str(data)}
    port = free_port()
    t0 = time.monotonic()
    # When they run `tuwen serve` (started as at a terminal: Ctrl-C raises KeyboardInterrupt)
    pieces: set[int] = set()
    try:
        with as_at_a_terminal([sys.executable, "-m", "tuwen.workers.cli", "serve", "--port", str(port), "--threads",
                               "1"], env=env, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT) as proc:
            assert proc.stdout is not None
            printed = []
            while "Ctrl-C stops everything." not in (line := proc.stdout.readline()):
                assert line, "".join(printed) + proc.communicate(timeout=30)[0]
                printed.append(line)
            ready_s = time.monotonic() - t0
            shown = "".join(printed)
            # Then it prints the API's address, the playground and a key
            assert f"http://127.0.0.1:{port}/v1" in shown and f"http://127.0.0.1:{port}/playground" in shown, shown
            token = re.search(r"API key\s+(sk-tw-\S+)", shown)
            assert token is not None, shown
            assert f"{data}/tuwen/storage" in shown  # pictures in the user's data directory
            pieces = children_of(proc.pid)
            assert len(pieces) >= 3, (pieces, shown)  # Redis, the worker, the gateway
            # And docs/openai.md's snippet, run as written from the repository, answers: whole, then streamed
            sample = next(s for s in load_samples() if s.path.name == "count-photo.png")
            printed = run_doc_snippet(openai_snippet(), f"http://127.0.0.1:{port}", token.group(1), sample.path,
                                      monkeypatch)
            answered_s = time.monotonic() - t0
            lines = printed.splitlines()
            assert all(fact in lines[0] for fact in sample.facts), printed  # the whole answer
            assert any(all(fact in line for fact in sample.facts) for line in lines[2:]), printed  # streamed
            assert (data / "tuwen" / "storage" / "images").is_dir()
            # And a second `tuwen serve` of the same user, or on the same port, says why it cannot start
            for other_env, other_port, why in (
                    (env, free_port(), f"another tuwen serve (pid {proc.pid}) uses {data}/tuwen/serve"),
                    ({**env, "XDG_DATA_HOME": str(tmp_path / "other")}, port, f"cannot listen on 127.0.0.1:{port}")):
                second = subprocess.run([sys.executable, "-m", "tuwen.workers.cli", "serve", "--port", str(other_port)],
                                        env=other_env, capture_output=True, text=True, timeout=60)
                assert second.returncode == 3 and why in second.stdout, second.stdout + second.stderr
            assert children_of(proc.pid) == pieces
            # When Ctrl-C is pressed once
            proc.send_signal(signal.SIGINT)
            rest, _ = proc.communicate(timeout=90)
    finally:  # what is left is counted, then killed (the pieces run in their own sessions)
        left = [pid for pid in pieces if alive(pid)]
        for pid in left:
            os.kill(pid, signal.SIGKILL)
    # Then it stops everything it started, and says so
    print(f"tuwen serve: ready after {ready_s:.1f}s, the snippet's streamed answer after {answered_s:.1f}s")
    assert proc.returncode == 0, rest
    assert "Traceback" not in rest and "no process of tuwen serve is left" in rest, rest
    assert not left, rest
    assert answered_s < 120


def test_the_key_is_saved_and_reused_while_redis_knows_it(tmp_path: Path) -> None:
    with LocalRedis() as server:
        from tuwen.pipeline.settings import Settings

        settings = Settings(redis_url=server.url, storage_dir=tmp_path / "storage")
        saved = tmp_path / "api-key"
        # A first start makes a key for the local owner and saves it, readable by the user alone
        token, fresh = _api_key(settings, saved)
        assert fresh and saved.read_text().strip() == token and saved.stat().st_mode & 0o777 == 0o600
        keys = KeyStore(connect(server.url))
        key = keys.authenticate(token)
        assert key is not None and key.owner == OWNER and key.rate_limit_per_minute == 0
        # A second start reuses it
        assert _api_key(settings, saved) == (token, False)
        # And once it is revoked, the next start makes a new one
        keys.revoke(key.id)
        again, fresh = _api_key(settings, saved)
        assert fresh and again != token and keys.authenticate(again) is not None
        keys.redis.close()
