"""Running RayJobs one after another: each once the one before succeeded (`lorag k8s apply --job ...`).

Whether to create, replace, wait for or give up on a job is decided by `next_action`, a pure
function of the jobs' phases (`job_phase`), both tested by table. `run_jobs` reads the jobs,
asks `next_action`, does it, and prints one line per change of a job's state.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, Literal, Mapping

from lorag.k8s_client import call, get, server_side_apply

POLL_S = 10.0  # how often `apply` reads the state of a job it waits for
DELETE_TIMEOUT_S = 600.0  # how long `apply` waits for a replaced RayJob to be gone

Phase = Literal["absent", "deleting", "active", "succeeded", "failed"]
Action = Literal["create", "replace", "wait", "done", "busy", "failed", "vanished"]


def job_phase(obj: dict | None) -> Phase:
    """Where a RayJob stands, from its object (None when there is none).

    "succeeded" is jobStatus SUCCEEDED once KubeRay marked the deployment Complete (the submitter
    has finished too); "failed" is a Failed or ValidationFailed deployment, or a Complete one whose
    job did not succeed (STOPPED); "deleting" an object with a deletionTimestamp; anything else
    (New, Initializing, Running, Waiting, Suspended, Retrying) is "active".
    """
    if obj is None:
        return "absent"
    if (obj.get("metadata") or {}).get("deletionTimestamp"):
        return "deleting"
    st = obj.get("status") or {}
    deployment, job = st.get("jobDeploymentStatus") or "", st.get("jobStatus") or ""
    if deployment == "Complete":
        return "succeeded" if job == "SUCCEEDED" else "failed"
    if deployment in ("Failed", "ValidationFailed"):
        return "failed"
    return "active"


def next_action(jobs: list[str], phases: Mapping[str, Phase], started: list[str]) -> tuple[Action, str | None]:
    """The next thing to do to run `jobs` in order, each only after the one before succeeded.

    Args:
        jobs: the RayJob names, in the order to run them.
        phases: each job's `job_phase` now.
        started: the jobs this run has created so far.

    Returns:
        `(action, job)`: "create" a job that is not there; "replace" (delete) one that ended before
        this run, to create it again once it is gone; "wait" for a job of this run to end or for an
        old one to be gone; "busy" when one not started by this run is still active (never replaced
        while it runs); "failed" when a job of this run failed; "vanished" when it disappeared
        before it ended; "done" (job None) when every job succeeded.
    """
    for job in jobs:
        phase = phases[job]
        if job not in started:
            return {"absent": "create", "deleting": "wait", "succeeded": "replace", "failed": "replace", "active": "busy"}[phase], job
        if phase == "succeeded":
            continue
        return {"failed": "failed", "active": "wait", "absent": "vanished", "deleting": "vanished"}[phase], job
    return "done", None


def run_jobs(api, objs: list[dict], wait: bool, timeout_s: float | None, poll_s: float, echo: Callable[[str], None]) -> None:
    """Run the RayJobs `objs` one after another, as `next_action` says; see `lorag.k8s.apply`.

    Raises:
        RuntimeError: a RayJob of that name still running from before, or a job that failed,
            vanished or outlasted `timeout_s` (later jobs are then not started).
    """
    run = _JobRun(api, {o["metadata"]["name"]: o for o in objs}, wait, timeout_s, poll_s, echo)
    while not run.step():
        pass


def job_state(obj: dict | None) -> str:
    """A RayJob's state in one line: deployment status, Ray job status, KubeRay's reason and message."""
    if obj is None:
        return "not found"
    st = obj.get("status") or {}
    text = f"{st.get('jobDeploymentStatus') or 'New'}, job {st.get('jobStatus') or 'not submitted'}"
    if (obj.get("metadata") or {}).get("deletionTimestamp"):
        text += ", being deleted"
    return text + "".join(f": {st[k]}" for k in ("reason", "message") if st.get(k))


@dataclass
class _JobRun:
    """The state of one `run_jobs`: what this run started, the last state printed per job, what it waits for."""

    api: object
    by_name: dict[str, dict]
    wait: bool
    timeout_s: float | None
    poll_s: float
    echo: Callable[[str], None]
    started: list[str] = field(default_factory=list)
    seen: dict[str, str] = field(default_factory=dict)  # the last state printed per job
    waiting: tuple[str, float, float] | None = None  # (job, since, limit)

    def __post_init__(self) -> None:
        self.names = list(self.by_name)
        self.ns = next(iter(self.by_name.values()))["metadata"]["namespace"]

    def step(self) -> bool:
        """Read every job, then do `next_action`'s one thing; True when nothing is left to do."""
        current = {n: get(self.api, self.ns, n) for n in self.names}
        phases = {n: job_phase(o) for n, o in current.items()}
        for n in self.started:
            if phases[n] == "succeeded" and self.seen.get(n) != "SUCCEEDED":
                self.echo(f"RayJob {self.ns}/{n}: SUCCEEDED")
                self.seen[n] = "SUCCEEDED"
        action, name = next_action(self.names, phases, self.started)
        if action == "done":
            self.echo(f"all {len(self.names)} job(s) SUCCEEDED: {', '.join(self.names)}")
            return True
        state = job_state(current[name])
        if action == "create":
            if self._create(name):
                return True
        elif action == "replace":
            self.echo(f"{self._where(name)} ended before ({state}): deleting it to run it again")
            # Foreground: the RayJob goes only after its submitter Job (named like it) and cluster, so the
            # new RayJob's submitter cannot be mistaken for the old one's.
            call(lambda: self.api.delete(name=name, namespace=self.ns, body={"propagationPolicy": "Foreground"}), self._where(name))
        elif action == "wait":  # for a job of this run to end, or for an old one to be gone
            self._wait(name, state)
        else:
            raise self._error(action, name, state)
        if action != "wait":
            self.waiting = None
        return False

    def _create(self, name: str) -> bool:
        """Create job `name`; True when this run ends here (it does not wait)."""
        where, ns = self._where(name), self.ns
        server_side_apply(self.api, self.by_name[name], where)
        self.started.append(name)
        self.seen.pop(name, None)
        self.echo(f"started {where} ({len(self.started)} of {len(self.names)}); its output: {self._logs(name)} -f (once its cluster is up)")
        if not self.wait:
            self.echo(f"not waiting: follow it with `kubectl get rayjob {name} -n {ns} -w` or `lorag k8s status`")
        return not self.wait

    def _wait(self, name: str, state: str) -> None:
        """Print a changed state, give up past the job's limit, else sleep one poll."""
        if state != self.seen.get(name):
            self.echo(f"{self._where(name)}: {state}")
            self.seen[name] = state
        if self.waiting is None or self.waiting[0] != name:
            deadline = self.by_name[name]["spec"]["activeDeadlineSeconds"] + 600
            limit = (self.timeout_s or deadline) if name in self.started else DELETE_TIMEOUT_S
            self.waiting = (name, time.monotonic(), limit)
        if time.monotonic() - self.waiting[1] > self.waiting[2]:
            where, ns, not_started = self._where(name), self.ns, self._not_started(name)
            if name in self.started:
                raise RuntimeError(
                    f"{where} did not end within {self.waiting[2]:.0f} s ({state}); lorag stopped waiting but not the job: "
                    f"follow it with `{self._logs(name)} -f` and `lorag k8s status`{not_started}"
                )
            raise RuntimeError(
                f"{where} is still being deleted after {self.waiting[2]:.0f} s ({state}): see what holds it with "
                f"`kubectl describe rayjob {name} -n {ns}`, then apply again{not_started}"
            )
        time.sleep(self.poll_s)

    def _error(self, action: Action, name: str, state: str) -> RuntimeError:
        """Why the run stops at job `name` ("busy", "failed" or "vanished"), and what to do."""
        where, ns, not_started = self._where(name), self.ns, self._not_started(name)
        if action == "busy":
            return RuntimeError(
                f"{where} is still running from before ({state}): wait for it to end (`lorag k8s status`), or stop it "
                f"with `kubectl delete rayjob {name} -n {ns}`, then apply again{not_started}"
            )
        if action == "failed":
            return RuntimeError(
                f"{where} failed ({state}): read its output with `{self._logs(name)}` and its events with "
                f"`kubectl describe rayjob {name} -n {ns}`{not_started}"
            )
        return RuntimeError(
            f"{where} was deleted before it ended (last seen {self.seen.get(name, 'New')}): someone deleted it, so lorag "
            f"cannot tell how it ended; run it again with --job {name.removeprefix('lorag-')}{not_started}"
        )

    def _where(self, name: str) -> str:
        return f"RayJob {self.ns}/{name}"

    def _logs(self, name: str) -> str:
        return f"kubectl logs -n {self.ns} job/{name}"

    def _not_started(self, name: str) -> str:
        rest = self.names[self.names.index(name) + 1:]
        return f"; not started: {', '.join(rest)}" if rest else ""
