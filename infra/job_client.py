"""The cluster's Ray Jobs API: tokens, submitting a job plan (infra/jobs.py), following, reading
back and stopping a job.

Authentication: Ray 2.60 clusters require a token by default. It is sent as
`Authorization: Bearer ...`, taken from `--token-file`, `$RAY_AUTH_TOKEN`, `$RAY_AUTH_TOKEN_PATH`
or `~/.ray/auth_token` (Ray's own order). A cluster refuses a missing token with HTTP 401 and a
wrong one with 403: both become `AuthError` with a message saying which.
"""

from __future__ import annotations

import asyncio
import os
import sys
import time
from pathlib import Path
from typing import Any, TextIO

from .errors import AuthError, SubmitError
from .jobs import JobPlan


# --------------------------------------------------------------------------------------------
# tokens and clients


def resolve_token(token_file: str | None = None) -> tuple[str | None, str]:
    """(token, where it came from): --token-file, $RAY_AUTH_TOKEN, $RAY_AUTH_TOKEN_PATH, ~/.ray/auth_token."""
    if token_file:
        p = Path(token_file).expanduser()
        if not p.is_file():
            raise SubmitError(f"--token-file {token_file}: no such file")
        tok = p.read_text().strip()
        if not tok:
            raise SubmitError(f"--token-file {token_file} is empty")
        return tok, f"--token-file {token_file}"
    if os.environ.get("RAY_AUTH_TOKEN", "").strip():
        return os.environ["RAY_AUTH_TOKEN"].strip(), "$RAY_AUTH_TOKEN"
    path = os.environ.get("RAY_AUTH_TOKEN_PATH")
    if path:
        p = Path(path).expanduser()
        if not p.is_file() or not p.read_text().strip():
            raise SubmitError(f"$RAY_AUTH_TOKEN_PATH={path} does not name a non-empty file")
        return p.read_text().strip(), "$RAY_AUTH_TOKEN_PATH"
    default = Path.home() / ".ray" / "auth_token"
    if default.is_file() and default.read_text().strip():
        return default.read_text().strip(), str(default)
    return None, "none"


def resolve_address(address: str | None) -> str:
    addr = address or os.environ.get("RAY_API_SERVER_ADDRESS") or os.environ.get("RAY_ADDRESS")
    if not addr:
        raise SubmitError("no cluster address: pass --address http://HEAD:8265 (the Ray dashboard / Jobs API) "
                          "or set RAY_ADDRESS")
    if "://" not in addr:
        addr = "http://" + addr
    return addr.rstrip("/")


def _auth_message(err: Exception, address: str, token_source: str) -> str:
    text = str(err)
    # no token sent: that is the reason, whatever words Ray's error chose (its texts vary by endpoint)
    if token_source == "none" or "401" in text or "Authentication required" in text:
        why = "it requires a token and none was sent"
    elif "403" in text or "invalid" in text.lower():
        why = f"the token from {token_source} is not this cluster's"
    else:
        why = text.splitlines()[0] if text else type(err).__name__
    return (f"the Ray cluster at {address} refused the request: {why}. Pass the cluster's token with "
            f"--token-file FILE (or RAY_AUTH_TOKEN / RAY_AUTH_TOKEN_PATH); on KubeRay it is in the Secret named "
            f"by spec.authOptions.secretName, key auth_token.")


def _is_auth_error(err: BaseException) -> bool:
    from ray.exceptions import AuthenticationError

    if isinstance(err, AuthenticationError):
        return True
    text = str(err)
    return "status code 401" in text or "status code 403" in text


class JobClient:
    """JobSubmissionClient with the token header and readable authentication errors."""

    def __init__(self, address: str | None = None, token_file: str | None = None, token: str | None = None):
        from ray.job_submission import JobSubmissionClient

        self.address = resolve_address(address)
        if token is not None:
            self.token, self.token_source = token, "argument"
        else:
            self.token, self.token_source = resolve_token(token_file)
        headers = {"Authorization": f"Bearer {self.token}"} if self.token else {}
        try:
            self.client = JobSubmissionClient(self.address, headers=headers)
        except Exception as err:  # noqa: BLE001 - classify
            if _is_auth_error(err):
                raise AuthError(_auth_message(err, self.address, self.token_source)) from None
            raise SubmitError(f"cannot reach the Ray Jobs API at {self.address}: {str(err).splitlines()[0]}") from None

    def _call(self, fn, *args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except Exception as err:  # noqa: BLE001 - classify
            if _is_auth_error(err):
                raise AuthError(_auth_message(err, self.address, self.token_source)) from None
            raise

    def submit(self, plan: JobPlan) -> str:
        return self._call(self.client.submit_job, entrypoint=plan.entrypoint, runtime_env=plan.runtime_env,
                          metadata=plan.metadata, submission_id=plan.submission_id,
                          entrypoint_num_cpus=plan.entrypoint_num_cpus, entrypoint_num_gpus=plan.entrypoint_num_gpus)

    def info(self, job_id: str):
        return self._call(self.client.get_job_info, job_id)

    def status(self, job_id: str):
        return self._call(self.client.get_job_status, job_id)

    def logs(self, job_id: str) -> str:
        return self._call(self.client.get_job_logs, job_id)

    def list(self):
        return self._call(self.client.list_jobs)

    def stop(self, job_id: str) -> bool:
        return self._call(self.client.stop_job, job_id)

    def follow(self, job_id: str, out: TextIO = sys.stdout, timeout_s: float | None = None,
               poll_s: float = 1.0) -> str:
        """Stream the job's logs to `out` until it ends (or timeout_s); returns the final status name."""
        deadline = None if timeout_s is None else time.monotonic() + timeout_s

        async def tail() -> None:
            async for chunk in self.client.tail_job_logs(job_id):
                out.write(chunk)
                out.flush()

        try:
            remaining = None if deadline is None else max(1.0, deadline - time.monotonic())
            asyncio.run(asyncio.wait_for(tail(), timeout=remaining))
        except asyncio.TimeoutError:
            pass
        except Exception as err:  # noqa: BLE001 - the websocket broke: fall back to polling
            if _is_auth_error(err):
                raise AuthError(_auth_message(err, self.address, self.token_source)) from None
            print(f"[gammaray] log stream interrupted ({err}); polling the job status", file=sys.stderr)
        # the websocket closes when the driver exits; the status may lag a moment behind
        while True:
            st = self.status(job_id)
            if st.is_terminal():
                return st.value
            if deadline is not None and time.monotonic() > deadline:
                return st.value
            time.sleep(poll_s)


# --------------------------------------------------------------------------------------------
# reading a job back


def job_summary(info) -> dict[str, Any]:
    """The parts of a JobDetails worth printing (never the env var values: only their names)."""
    rt = info.runtime_env or {}
    return {
        "submission_id": info.submission_id,
        "status": str(info.status),
        "message": info.message,
        "entrypoint": info.entrypoint,
        "start_time": _fmt_ms(info.start_time),
        "end_time": _fmt_ms(info.end_time),
        "driver_exit_code": getattr(info, "driver_exit_code", None),
        "metadata": {k: v for k, v in (info.metadata or {}).items() if k.startswith("gammaray.")},
        "env_var_names": sorted((rt.get("env_vars") or {}).keys()),
    }


def _fmt_ms(ms: int | None) -> str | None:
    if not ms:
        return None
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ms / 1000))
