"""Starting a local Ray instance the way every gammaray command does (pipelines and workers alike)."""

from __future__ import annotations

import contextlib
import os
from typing import Iterator


@contextlib.contextmanager
def private_tmpdir_for_ray() -> Iterator[str]:
    """The processes of a local Ray instance started inside this block (GCS, raylet, dashboard, the
    workers they start) get a TMPDIR of their own, removed when this process exits, after Ray's
    shutdown. Ray stops them with signals, so Python's exit hooks never run in them: the dashboard's
    multiprocessing folder (`pymp-*`) and whatever a killed worker left behind would otherwise stay in
    the user's TMPDIR, one per command. Ray's own session folder stays where Ray puts it
    (RAY_TMPDIR, else TMPDIR/ray: its logs outlive the command)."""
    import atexit
    import shutil
    import tempfile

    saved = {k: os.environ.get(k) for k in ("TMPDIR", "RAY_TMPDIR")}
    ray_tmp = saved["RAY_TMPDIR"] or saved["TMPDIR"] or "/tmp"  # where Ray would put its session folder
    private = tempfile.mkdtemp(prefix="gammaray-ray-", dir=tempfile.gettempdir())
    # registered before ray.init, so it runs after the shutdown hook ray.init registers (atexit is LIFO)
    atexit.register(shutil.rmtree, private, True)
    os.environ.update(TMPDIR=private, RAY_TMPDIR=ray_tmp)
    try:
        yield private
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
