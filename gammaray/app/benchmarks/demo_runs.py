"""`gammaray bench demo`: the README's demo output, from fresh runs of `gammaray demo` as a user runs it.

Runs `gammaray demo --json` N times (default 3), each in its own process with its own S3 server and Ray,
with the demo's defaults (run.seed 0) unless --set/--config say otherwise. Runs of the same seed are not
bit-identical unless everything in them is: until 2026-12-07 the demo's tokenizer was not (the
WordPiece trainer of HF tokenizers built a slightly different vocabulary in every process;
pipelines/tokenizer.py now seeds it, huggingface/tokenizers#1794), and runs spread over R@1 0.052 to
0.068. Since then runs of the same code and seed are identical, and the bench keeps checking: the
JSON keeps every run, their mean and sample standard deviation, and the console output of the first
run. The README's demo block is rendered from it by `python -m
gammaray.app.docs`.

    gammaray bench demo --runs 3 --json docs/bench/demo.json
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import shlex
import statistics
import subprocess
import sys
import tempfile
import time

from gammaray.app.benchmarks.common import markdown_table

# the summary's figures that vary from run to run, in the order the README shows them
FIGURES = [("r_at_1_i2t", "R@1 image->text"), ("r_at_1_t2i", "R@1 text->image"),
           ("r_at_5_i2t", "R@5 image->text"), ("r_at_5_t2i", "R@5 text->image"),
           ("r_at_10_i2t", "R@10 image->text"), ("r_at_10_t2i", "R@10 text->image"),
           ("zero_shot_acc", "zero-shot category accuracy"), ("loss", "training loss (last epoch)"),
           ("wall_s", "wall time s")]


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--runs", type=int, default=3, help="fresh `gammaray demo` runs (default 3)")
    p.add_argument("--json", metavar="PATH", help="write every run, mean and std as JSON (docs/bench/demo.json)")
    p.add_argument("--demo-args", default="", metavar="ARGS",
                   help="extra arguments for every `gammaray demo`, e.g. '--n-train 300 --n-val 60' (default none)")
    p.add_argument("--collect", nargs="+", metavar="SUMMARY.json",
                   help="run nothing: collect runs already made, each by `gammaray demo --json SUMMARY.json`")
    p.add_argument("--console", metavar="STDOUT.txt", help="with --collect: the first run's stdout")


def spread(runs: list[dict]) -> dict:
    """figure -> [mean, sample std (0 for one run), min, max] over the runs."""
    out = {}
    for key, _ in FIGURES:
        vals = [float(r[key]) for r in runs]
        out[key] = [statistics.fmean(vals), statistics.stdev(vals) if len(vals) > 1 else 0.0, min(vals), max(vals)]
    return out


def console_text(stdout: str) -> str:
    """The demo's own lines (stages, prepare's report, the summary); progress bars and Ray's lines go to stderr."""
    text = "\n".join(line.rstrip() for line in stdout.replace("\r", "\n").splitlines())
    return re.sub(r"\n{3,}", "\n\n", text).strip("\n")


def one_run(i: int, workdir: str, demo_args: list[str]) -> tuple[dict, str]:
    env = dict(os.environ)
    for k in ("AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        env.pop(k, None)  # the demo starts its own S3 server, as on a fresh machine
    name = f"demo-{i}.json"
    cmd = [sys.executable, "-m", "gammaray.app.cli", "demo", "--json", name] + demo_args
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=workdir)
    if proc.returncode != 0:
        raise RuntimeError(f"run {i}: `gammaray demo` exited {proc.returncode}:\n{proc.stdout[-3000:]}{proc.stderr[-3000:]}")
    with open(os.path.join(workdir, name)) as f:
        return json.load(f), console_text(proc.stdout)


def git_commit() -> str | None:
    try:
        root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              cwd=root, timeout=10).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def format_table(data: dict) -> str:
    """One column per run, then mean ± std (the README's spread table)."""
    runs, sp = data["runs"], data["spread"]
    header = ["figure"] + [f"run {i + 1}" for i in range(len(runs))] + ["mean ± std"]

    def fmt(key, v):
        return f"{v:.1f}" if key == "wall_s" else f"{v:.4f}" if key == "loss" else f"{v:.3f}"

    rows = [[label] + [fmt(key, r[key]) for r in runs] + [f"{fmt(key, sp[key][0])} ± {fmt(key, sp[key][1])}"]
            for key, label in FIGURES]
    return markdown_table(header, rows)


def readme_block(data: dict) -> str:
    """The README's demo block: the first run's console output, then every run and the spread."""
    sp, n = data["spread"], len(data["runs"])
    m = data["machine"]
    if all(sp[key][1] == 0 for key, _ in FIGURES if key != "wall_s"):
        intro = (f"The demo is deterministic: {n} fresh runs of the same code and seed gave the same figures, the "
                 f"training loss to the last digit (the output above is run 1's):")
    else:
        intro = (f"Runs are not bit-identical, so here are {n} fresh runs of the same code and seed (the output "
                 f"above is run 1's); mean ± sample standard deviation over the {n}:")
    return (f"```\n$ make demo\n{data['console']}\n```\n\n"
            f"{intro}\n\n"
            f"{format_table(data)}\n\n"
            f"R@1 {sp['r_at_1_i2t'][0]:.3f} ± {sp['r_at_1_i2t'][1]:.3f} (image->text) / "
            f"{sp['r_at_1_t2i'][0]:.3f} ± {sp['r_at_1_t2i'][1]:.3f} (text->image), zero-shot "
            f"{sp['zero_shot_acc'][0]:.3f} ± {sp['zero_shot_acc'][1]:.3f}: chance is "
            f"{data['runs'][0]['chance_r_at_1']:.3f} and {data['runs'][0]['zero_shot_chance']:.3f}.\n\n"
            f"*{data['date']}, commit {data['commit']}, {m['cpus']} CPUs ({m['note']}); command: "
            f"`{data['command']}`. Source: `docs/bench/demo.json`.*")


def collect(paths: list[str], console_path: str | None) -> tuple[list[dict], str]:
    runs = []
    for path in paths:
        with open(path) as f:
            runs.append(json.load(f))
    console = ""
    if console_path:
        with open(console_path) as f:
            console = console_text(f.read()).replace(os.path.dirname(os.path.abspath(paths[0])) + "/", "")
    return runs, console


def run(args: argparse.Namespace) -> int:
    demo_args = args.demo_args.split()
    load_before = os.getloadavg()
    runs, console = [], None
    with tempfile.TemporaryDirectory(prefix="gammaray-bench-demo-") as workdir:
        if args.collect:
            runs, console = collect(args.collect, args.console)
        for i in range(1, 0 if args.collect else args.runs + 1):
            t = time.perf_counter()
            summary, text = one_run(i, workdir, demo_args)
            console = console or text
            runs.append(summary)
            print(f"run {i}/{args.runs}: R@1 {summary['r_at_1_i2t']:.3f} / {summary['r_at_1_t2i']:.3f}, zero-shot "
                  f"{summary['zero_shot_acc']:.3f} ({time.perf_counter() - t:.0f} s)", flush=True)
    data = {
        "command": (f"gammaray demo --json RUN.json in {len(runs)} fresh processes, then gammaray bench demo "
                    f"--collect RUN.json... --console STDOUT.txt --json docs/bench/demo.json" if args.collect
                    else "gammaray bench demo " + shlex.join(sys.argv[3:]) if sys.argv[1:3] == ["bench", "demo"]
                    else f"gammaray bench demo --runs {args.runs}"),
        "date": datetime.date.today().isoformat(),
        "commit": git_commit(),
        "demo_args": demo_args,
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                    "load_before": [round(x, 1) for x in load_before],
                    "load_after": [round(x, 1) for x in os.getloadavg()],
                    "note": "a shared machine: other jobs ran beside these runs, so wall times are not an idle "
                            "machine's" if max(load_before) > 1.5 else "no other load at the start"},
        "runs": runs,
        "spread": spread(runs),
        "console": console,
    }
    print(format_table(data))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(data, f, indent=2)
            f.write("\n")
        print(f"written {args.json}")
    return 0


def cause_table(data: dict) -> str:
    """docs/bench/demo-cause.json: the demo's figures per (code, catalogue) pair, mean ± std over its runs."""
    keys = ["r_at_1_i2t", "r_at_1_t2i", "r_at_5_i2t", "r_at_5_t2i", "r_at_10_i2t", "r_at_10_t2i", "zero_shot_acc"]
    header = ["code", "catalogue (pipelines/synthetic.py)", "runs", "R@1 i->t", "R@1 t->i", "R@5 i->t", "R@5 t->i",
              "R@10 i->t", "R@10 t->i", "zero-shot"]

    def cell(vals: list[float]) -> str:
        if len(vals) == 1:
            return f"{vals[0]:.3f}"
        return f"{statistics.fmean(vals):.3f} ± {statistics.stdev(vals):.3f}"

    rows = [[v["code"], v["catalogue"], str(len(v["runs"]))] + [cell([float(r[k]) for r in v["runs"]]) for k in keys]
            for v in data["variants"]]
    return (markdown_table(header, rows) + "\n\n"
            f"*{data['setting']}. Commands: " + "; ".join(f"`{v['command']}`" for v in data["variants"])
            + ". Source: `docs/bench/demo-cause.json`.*")
