"""``tuwen result / cancel / delete`` as a user runs them: ids printed as text, never as markup; no such job
and another owner's job read exactly alike; documented exit codes. The matrices run the command in this
process (``tests.cli``); one test runs it as a real subprocess."""

from __future__ import annotations

import json
import subprocess
import uuid
from collections.abc import Iterator

import pytest

from tuwen.pipeline.client import Client
from tuwen.pipeline.errors import Forbidden
from tuwen.pipeline.jobs import no_such_job
from tuwen.pipeline.schema import JobStatus
from tuwen.pipeline.settings import Settings
from tests.cli import tuwen_here, tuwen_process
from tuwen.workers.demo.samples import load_samples

pytestmark = [pytest.mark.integration, pytest.mark.timeout(240)]

JOB_COMMANDS = (["result"], ["result", "--json"], ["result", "--wait", "1"], ["cancel"], ["cancel", "--json"],
                ["delete"])


@pytest.fixture
def idle_client(pipeline_settings: Settings) -> Iterator[Client]:
    """A client on queues no worker reads: its jobs stay queued."""
    tag = uuid.uuid4().hex[:8]
    client = Client(pipeline_settings.model_copy(update={"interactive_queue": f"cli-i-{tag}",
                                                         "bulk_queue": f"cli-b-{tag}"}))
    yield client
    client.close()


def tuwen(settings: Settings, *args: str) -> subprocess.CompletedProcess[str]:
    return tuwen_here(*args, env=settings.to_env())


def test_the_command_prints_an_id_with_markup_as_typed(pipeline_settings: Settings) -> None:
    """The smoke test of the matrices below: the installed command, a real process."""
    out = tuwen_process("result", "[bold red]x", env=pipeline_settings.to_env())
    assert out.returncode == 1 and out.stderr.strip() == "error not_found: no job [bold red]x", out.stderr
    as_json = tuwen_process("cancel", "[/x]", "--json", env=pipeline_settings.to_env())
    assert as_json.returncode == 1 and json.loads(as_json.stdout)["error"]["message"] == "no job [/x]"


def test_job_ids_with_markup_are_printed_as_typed(pipeline_settings: Settings) -> None:
    for job_id in ("[/x]", "[bold red]x", "[link=http://x]y"):
        for command in JOB_COMMANDS:
            out = tuwen(pipeline_settings, command[0], job_id, *command[1:])
            # no MarkupError traceback; the documented "no such job" exit code; the id as typed
            assert out.returncode == 1, (command, out.stderr)
            assert "Traceback" not in out.stderr, (command, out.stderr)
            if "--json" in command:
                assert json.loads(out.stdout)["error"] == {"code": "not_found", "message": f"no job {job_id}",
                                                          "retryable": False}
            else:
                assert out.stderr.strip() == f"error not_found: no job {job_id}", (command, out.stderr)


def test_another_owners_job_reads_exactly_like_no_job(idle_client: Client) -> None:
    # Given school-a's queued job, and an id that was never used
    sample = load_samples()[1]
    job = idle_client.submit(sample.path.read_bytes(), sample.question, owner="school-a")
    never = uuid.uuid4().hex
    # When school-b asks for either, through every command
    for command in JOB_COMMANDS:
        theirs = tuwen(idle_client.settings, command[0], job.id, "--owner", "school-b", *command[1:])
        absent = tuwen(idle_client.settings, command[0], never, "--owner", "school-b", *command[1:])
        # Then the answers are the same but for the id: same exit code, same words
        assert theirs.returncode == absent.returncode == 1, (command, theirs.stderr)
        assert theirs.stdout.replace(job.id, "ID") == absent.stdout.replace(never, "ID"), command
        assert theirs.stderr.replace(job.id, "ID") == absent.stderr.replace(never, "ID"), command
    # And through the client the error is the same one as well
    with pytest.raises(Forbidden) as info:
        idle_client.get(job.id, owner="school-b")
    assert info.value.to_dict() == no_such_job(job.id).to_dict() == {"code": "not_found", "message": f"no job {job.id}"}
    # And the job is untouched for its owner, who can cancel it (exit 0) and then delete it
    assert idle_client.get(job.id, owner="school-a").status == JobStatus.queued
    cancelled = tuwen(idle_client.settings, "cancel", job.id, "--owner", "school-a")
    assert cancelled.returncode == 0 and cancelled.stdout.split() == [job.id, "cancelled"]
    deleted = tuwen(idle_client.settings, "delete", job.id, "--owner", "school-a")
    assert deleted.returncode == 0 and deleted.stdout.split() == [job.id, "deleted"]
    again = tuwen(idle_client.settings, "delete", job.id, "--owner", "school-a")
    assert again.returncode == 1 and again.stderr.strip() == f"error not_found: no job {job.id}"
