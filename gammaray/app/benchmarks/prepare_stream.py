"""`gammaray bench prepare-stream`: peak RSS of `gammaray prepare` on a large JSONL with one huge line.

Writes a JSONL of about `--total-mb` MB: ordinary records (a title and a description of
`--record-kb` KB, one of 4 small shared JPEGs) and, in the middle, one line of `--line-mb` MB. Then,
each in a fresh `python -c` child that imports only `pipelines.prepare`, so its peak RSS is its own
(VmHWM of /proc/self/status: the peak of the child's own address space. Not ru_maxrss: on Linux a
child's ru_maxrss starts from its parent's RSS at the fork, so it reported this command's own ~270 MiB
for any prepare below that):

  prepare     `prepare` with data.max_record_bytes (the huge line is quarantined as oversized_record
              while it streams past)
  read whole  what the readers did before streaming: the file read whole and split into lines (the
              floor of the old peak; the old prepare also parsed, validated and wrote on top of it)

Figures: peak RSS (MiB) of each, records/s of the prepare, and the counts.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--total-mb", type=int, default=1024, help="size of the JSONL (default 1024)")
    p.add_argument("--line-mb", type=int, default=300, help="size of the one huge line (default 300)")
    p.add_argument("--record-kb", type=float, default=6.0, help="text per ordinary record, KB (default 6)")
    p.add_argument("--max-record-mb", type=int, default=16, help="data.max_record_bytes in MiB (default 16)")
    p.add_argument("--workdir", help="where to write the source and catalogue (default: a temporary folder)")
    p.add_argument("--json", metavar="PATH", help="write the figures as JSON")


def write_source(folder: str, total_mb: int, line_mb: int, record_kb: float) -> tuple[str, int]:
    from pipelines import faults

    os.makedirs(os.path.join(folder, "img"), exist_ok=True)
    for i in range(4):
        with open(os.path.join(folder, "img", f"{i}.jpg"), "wb") as f:
            f.write(faults.good_jpeg(side=32, seed=i))
    words = ("lamp brass shade linen oak table floor desk warm light " * 400).split()
    body = " ".join(words)[: int(record_kb * 1024)]
    n = max(1, (total_mb - line_mb) * 2**20 // (len(body) + 120))
    path = os.path.join(folder, "items.jsonl")
    with open(path, "wb") as f:
        for i in range(n):
            if i == n // 2:
                f.write(b'{"product_id": "HUGE", "title": "')
                chunk = b"w" * 2**20
                for _ in range(line_mb):
                    f.write(chunk)
                f.write(b'", "image": "img/0.jpg"}\n')
            rec = {"product_id": f"P{i:08d}", "title": f"lamp {i}", "description": body[: 8000 - 20],
                   "image": f"img/{i % 4}.jpg"}
            f.write(json.dumps(rec).encode() + b"\n")
    return path, n


PEAK_RSS = """
def peak_rss_mib():
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:")) / 1024
    except (OSError, StopIteration):  # not Linux: ru_maxrss (includes the parent's RSS at the fork there too)
        import resource
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
"""

PREPARE_CHILD = PEAK_RSS + """
import json, sys, time
from pipelines.prepare import PrepareOptions, prepare
t0 = time.perf_counter()
res = prepare(sys.argv[1], sys.argv[2], PrepareOptions(progress=False, max_record_bytes=int(sys.argv[3])))
print(json.dumps({"wall_s": time.perf_counter() - t0, "input": res.num_input, "written": res.num_written,
                  "quarantined": res.quarantine_by_reason,
                  "peak_rss_mib": peak_rss_mib()}))
"""

READ_WHOLE_CHILD = PEAK_RSS + """
import json, sys
import pipelines.prepare  # the same imports as the prepare child
with open(sys.argv[1], "rb") as f:
    lines = f.read().splitlines()
print(json.dumps({"lines": len(lines), "peak_rss_mib": peak_rss_mib()}))
"""


def _in_child(code: str, *args) -> dict:
    """A fresh interpreter that imports only what prepare needs: its peak RSS is prepare's own."""
    out = subprocess.run([sys.executable, "-c", code, *map(str, args)], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def run(args: argparse.Namespace) -> int:
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        t0 = time.perf_counter()
        src, n = write_source(os.path.join(tmp, "raw"), args.total_mb, args.line_mb, args.record_kb)
        size = os.path.getsize(src)
        print(f"source: {size / 2**20:.0f} MiB, {n} records + one line of {args.line_mb} MiB "
              f"(written in {time.perf_counter() - t0:.0f} s)")
        prep = _in_child(PREPARE_CHILD, src, os.path.join(tmp, "catalog"), args.max_record_mb * 2**20)
        whole = _in_child(READ_WHOLE_CHILD, src)
    rows = [["prepare (streamed, max_record_bytes %d MiB)" % args.max_record_mb, f"{prep['peak_rss_mib']:.0f}",
             f"{prep['input'] / prep['wall_s']:.0f}",
             f"{prep['written']} written, {sum(prep['quarantined'].values())} quarantined {prep['quarantined']}"],
            ["read whole + split (the old readers)", f"{whole['peak_rss_mib']:.0f}", "-", f"{whole['lines']} lines"]]
    cols = ["what", "peak RSS MiB", "records/s", "counts"]
    for r in [cols, *rows]:
        print(f"{r[0]:<44} {r[1]:>12} {r[2]:>10}  {r[3]}")
    if args.json:
        with open(args.json, "w") as f:
            load = f"load average {load_before[0]:.1f} before, {os.getloadavg()[0]:.1f} after"
            json.dump({"provenance": f"measured by this command on a {os.cpu_count()}-CPU machine ({load})",
                       "command": f"gammaray bench prepare-stream --total-mb {args.total_mb} --line-mb {args.line_mb}",
                       "setting": f"JSONL of {size / 2**20:.0f} MiB: {n} records of ~{args.record_kb:g} KB text "
                                  f"+ one {args.line_mb} MiB line; each figure from a fresh process (its VmHWM)",
                       "columns": cols, "rows": rows}, f, indent=1)
    return 0
