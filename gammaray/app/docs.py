"""Writes the docs' generated parts from committed files: the benchmark tables from the JSON results in
docs/bench/ and the configuration key reference from the descriptions in gammaray/config/.

    python -m gammaray.app.docs            # rewrite what is stale
    python -m gammaray.app.docs --check    # exit 1 and name what is stale (tests/test_docs.py runs this)

Two kinds of output. Whole files (GENERATED_FILES), e.g. docs/bench/recipe.md. Blocks inside hand-written
pages (README.md and docs/**/*.md), between

    <!-- generated: NAME ... -->
    <!-- end generated -->

whose body is BLOCKS[NAME](); the text around a block is the page's own. Tables of results whose raw
output was not kept are transcribed into a JSON with a `provenance` field (TRANSCRIBED) and rendered
from it with that provenance under the table, so the page says so.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import re
import sys
from pathlib import Path

# the benchmarks' own report functions (one place for these imports)
from gammaray.config import describe
from gammaray.app.benchmarks import batch, demo_runs, recipe, scale, search, structure, synthetic, tune_structure
from gammaray.app.benchmarks import step as step_bench

ROOT = Path(__file__).resolve().parents[2]
BENCH = "docs/bench"
BLOCK = re.compile(r"<!-- generated: (?P<name>[\w-]+)[^\n]*?-->\n(?P<body>.*?)<!-- end generated -->", re.S)
TRANSCRIBED = ("loss-montecarlo", "batch-timing", "decode", "ingest", "scaling", "embed-h100")


def load(name: str):
    with open(ROOT / BENCH / name) as f:
        return json.load(f)


def cell(text) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def markdown_table(columns: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(c) for c in r) + " |" for r in rows]
    return "\n".join(lines)


def transcribed_table(name: str) -> str:
    data = load(f"{name}.json")
    return (markdown_table(data["columns"], data["rows"]) + "\n\n"
            f"*Transcribed, not regenerated: {data['provenance']} ({data['setting']}; command: "
            f"`{data['command']}`). Source: `{BENCH}/{name}.json`.*")


def measured_table(name: str) -> str:
    """A table a benchmark wrote as {columns, rows, provenance, setting, command}."""
    data = load(f"{name}.json")
    return (markdown_table(data["columns"], data["rows"]) + "\n\n"
            f"*{data['setting']}; {data['provenance']}: `{data['command']}`. Source: `{BENCH}/{name}.json`.*")


def synthetic_table(name: str) -> str:
    return synthetic.format_table(synthetic.summary_rows(load(f"{name}.json")))


def batch_table() -> str:
    return batch.format_rows(load("batch-synthetic.json") + load("batch-openclipart.json"))


def structure_table(name: str) -> str:
    """structure.py prints a console table; the docs show the same summary (mean ± std over seeds) as markdown."""
    summary = structure.summarize(load(f"{name}.json"))
    columns = ["model", "variant", "R@1", "probe image-only", "probe text-only", "probe shared", "modality gap"]
    rows = [[model, variant] + [f"{v[m][0]:.3f} ± {v[m][1]:.3f}" for m in structure.METRICS]
            for (model, variant), v in summary.items()]
    return markdown_table(columns, rows)


def scale_table() -> str:
    """`gammaray bench scale`: one row per metric, one column per catalogue size, the fitted growth."""
    rows = load("scale.json")
    synthetic_sizes = sorted({r["n"] for r in rows if r.get("synthetic_manifest")})
    cpus = sorted({r["cpus"] for r in rows if "cpus" in r})
    cpu = "; ".join(f"`{m}` at {r['n']:,}: {r['cpu_s']:.3f} s" for m in ("plan_setup_s", "embed_setup_s")
                    for r in rows if r["metric"] == m and "cpu_s" in r and r.get("synthetic_manifest"))
    return (scale.markdown(rows) + "\n\n"
            f"CPU time of the setup (`cpu_s`, what a loaded machine does not inflate): {cpu}.\n\n"
            f"*Every figure measured (`measured: true`), each in a fresh process. Sizes "
            f"{', '.join(f'{n:,}' for n in synthetic_sizes)}: synthetic manifests (plan and embed setup only). "
            f"prepare ran with cpus = {', '.join(map(str, cpus))}; plan over W = "
            f"{rows[[r['metric'] for r in rows].index('plan_setup_s')].get('workers')} workers. "
            + "".join(f"{run}. " for run in sorted({r["run"] for r in rows if r.get("run")}))
            + f"Source: `{BENCH}/scale.json`.*")


def tune_structure_table(name: str = "tune-structure") -> str:
    rows = load(f"{name}.json")
    return tune_structure.markdown_table(rows, tuple(dict.fromkeys(r["variant"] for r in rows)))  # its own labels


# the GPU check's result files and the code each ran on (the files hold the run, not the commit)
GPU_CHECKS = [("gpu-check-zero.json", "before issue 15's restructure"),
              ("gpu-check-ddp.json", "before issue 15's restructure"),
              ("gpu-check-zero2-restructured.json", "after it (83ff507)")]


def gpu_check_table() -> str:
    """The GPU check's runs (gammaray.app.benchmarks.gpu_check), all strategies, from its JSON files."""
    runs, env = [], {}
    for name, code in GPU_CHECKS:
        data = load(f"gpu/{name}")
        env = data["env"]
        runs += [dict(r, code=code) for r in data["runs"]]
    columns = ["run", "code", "ok", "steps", "step s", "samples/s", "peak GPU MB", "val R@1", "chance",
               "checkpoint holds"]
    rows = [[r["run"], r["code"], "yes" if r["ok"] else "NO", r["steps"], f"{r['step_time_s']:.4f}",
             f"{r['samples_per_s']:.0f}", f"{r['peak_gpu_mem_mb']:.0f}", f"{r['val_r_at_1']:.3f}",
             f"{r['chance_r_at_1']:.3f}",
             ", ".join(k for k, v in r["checkpoint_has"].items() if v and k != "deepspeed_files")
             + f"; {r['checkpoint_has']['deepspeed_files']} DeepSpeed files"] for r in runs]
    sources = ", ".join(f"`{BENCH}/gpu/{name}`" for name, _ in GPU_CHECKS)
    return (markdown_table(columns, rows) + "\n\n"
            f"*{env['device']}, torch {env['torch']} (CUDA {env['cuda']}), DeepSpeed {env['deepspeed']}, Ray {env['ray']}. "
            f"Source: {sources}.*")


def gpu_step_table() -> str:
    """`gammaray bench scaling --gpu --workers 1` at three micro-batches: the optimizer step of each loss."""
    rows = [r for b in (16, 64, 256) for r in load(f"gpu/step-h200-b{b}.json")]
    by = {(r["loss"], r["batch_size"]): r for r in rows}
    batches = sorted({r["batch_size"] for r in rows})
    columns = ["micro-batch", "InfoNCE step s", "gamma step s", "gamma / InfoNCE", "InfoNCE samples/s", "gamma samples/s"]
    table = [[b, f"{by['infonce', b]['step_time_s']:.4f}", f"{by['gamma', b]['step_time_s']:.4f}",
              f"{by['gamma', b]['step_time_s'] / by['infonce', b]['step_time_s']:.2f}",
              f"{by['infonce', b]['samples_per_s']:.0f}", f"{by['gamma', b]['samples_per_s']:.0f}"] for b in batches]
    r0 = rows[0]
    return (markdown_table(columns, table) + "\n\n"
            f"*One H200, 1 worker, ZeRO-{r0['zero_stage']}, the default model ({r0['params']:,} parameters, embed dim "
            f"{r0['embed_dim']}), bf16; one run of 20 timed steps after 5 warm-up steps per cell. Source: "
            f"`{BENCH}/gpu/step-h200-b{{16,64,256}}.json`.*")


def gpu_towers_table() -> str:
    """`gammaray bench scaling --gpu --workers 1 --config configs/random-towers.yaml`: step time and peak GPU
    memory at the size of the pretrained towers, per micro-batch and ZeRO stage, every row as measured."""
    files = [f"gpu/step-towers-b{b}.json" for b in (16, 64, 256)] + ["gpu/step-towers-zero.json"]
    columns = ["ZeRO", "micro-batch", "loss", "row in its process", "step s", "samples/s", "peak GPU MB",
               "MB left by the row before"]
    table, rows = [], []
    for name in files:
        seen: set = set()
        for r in load(name):  # files before --process-per-row: one process per (file, ZeRO, micro-batch)
            cell = (r["zero_stage"], r["batch_size"])
            order = "only" if r.get("rows_in_process") == 1 else "second" if cell in seen else "first"
            table.append([r["zero_stage"], r["batch_size"], r["loss"], order,
                          f"{r['step_time_s']:.3f}", f"{r['samples_per_s']:.0f}", f"{r['peak_gpu_mb']:,.0f}",
                          f"{r['start_gpu_mb']:,.0f}"])
            seen.add(cell)
            rows.append(r)
    r0 = rows[0]
    return (markdown_table(columns, table) + "\n\n"
            f"*One {r0['device']}, 1 worker, bf16; EfficientNet-Lite0 + a 6-layer 384-wide BERT (vocabulary "
            f"{r0['vocab_size']:,}), randomly initialised, {r0['params']:,} parameters; images {r0['image_size']} px, "
            f"{r0['text_tokens']} tokens; one run of 20 timed steps after 5 warm-up steps per row; the two losses of a "
            f"cell ran one after the other in one process. Source: `{BENCH}/gpu/step-towers-b{{16,64,256}}.json`, "
            f"`{BENCH}/gpu/step-towers-zero.json`.*")


def cores_per_gpu_table() -> str:
    """How many CPU cores keep one GPU fed: the stream's CPU ms per image (`bench image-max-side`) times the
    samples/s of a measured GPU step (the random-towers rows of `bench scaling --gpu`), over the share of
    the decode limit the stream reaches (`bench ingest`)."""
    photos = load("image-max-side.json")
    ingest = load("ingest.json")
    efficiency = float(ingest["rows"][0][ingest["columns"].index("gammaray / limit")].rstrip("%")) / 100
    rates = {}
    for b in (16, 64, 256):
        r = load(f"gpu/step-towers-b{b}.json")[0]  # the first row of its process: nothing left over before it
        rates[b] = (r["samples_per_s"], r["device"])
    ms_col = photos["columns"].index("stream ms per image at 224")
    columns = ["images stored as", "stream CPU ms per image"] + [
        f"cores at micro-batch {b} ({rate:,.0f} samples/s)" for b, (rate, _) in rates.items()]
    table = []
    for row in photos["rows"]:
        ms = float(row[ms_col])
        table.append([row[0], f"{ms:.2f}"] + [f"{rate * ms / 1000 / efficiency:.1f}" for rate, _ in rates.values()])
    device = next(iter(rates.values()))[1]
    return (markdown_table(columns, table) + "\n\n"
            f"*cores = samples/s x CPU ms per image / 1000 / {efficiency:.2f}, where {efficiency:.2f} is the share "
            f"of the decode limit the training stream reached in `gammaray bench ingest`. Samples/s: one {device}, "
            "gammaray's step of 2026-12-04 (ZeRO-1, bf16, random-towers, InfoNCE), from the GPU table in "
            "[training](training.md); CPU ms: 1600x1067 JPEG product photos on one core of the 2-core machine "
            f"(`{photos['command']}`). Text tokenisation is not counted. Source: `{BENCH}/image-max-side.json`, "
            f"`{BENCH}/gpu/step-towers-b{{16,64,256}}.json`, `{BENCH}/ingest.json`.*")


def step_table() -> str:
    """`gammaray bench step`: gammaray's step against the plain PyTorch step, every row as measured."""
    rows, details = load("step.json"), load("step.details.json")
    runs = {k: v for k, v in details.items() if v.get("note")}
    shared = len({v["note"] for v in runs.values()}) == 1  # one machine note for every run: said once
    protocol = {k: f"torch {v['torch']}, {v['threads']} thread{'s' if v['threads'] != 1 else ''}, "
                   f"{'CPU' if v.get('clock') == 'cpu' else 'wall-clock'} time, fastest of {v['repeats']} "
                   f"windows of {_window(v)} after {v['warmup']}" for k, v in runs.items()}
    notes = "; ".join(f"{k}: {p}" if shared else f"{k}: {runs[k]['note']} ({p})" for k, p in protocol.items())
    if shared and runs:
        notes = f"{next(iter(runs.values()))['note']}. {notes}"
    return (step_bench.table(rows) + "\n\n"
            f"*{notes}. Source: `{BENCH}/step.json`, `{BENCH}/step.details.json`.*")


def _window(details: dict) -> str:
    if details.get("min_window_s"):  # since windows alternate losses and last a minimum time
        return f"at least {details['steps']} steps and {details['min_window_s']:g} s, the losses and steps alternating"
    return f"{details['steps']} steps"


def step_summary() -> str:
    lines = [f"- {line}" for line in step_bench.summary(load("step.json"))]
    for k, v in load("step.details.json").items():
        p = v.get("profile")
        if p:
            phases = ", ".join(f"{name} {ms:.2f}" for name, ms in sorted(p["phases_ms"].items(), key=lambda x: -x[1]))
            lines.append(f"- Phases of the gammaray step ({k}, {p['loss']}, micro-batch {p['batch_size']}, "
                         f"torch.profiler, ms per step of {p['step_ms_profiled']:.2f} {p.get('clock', 'wall')}-clock, "
                         f"profiler included; phases in its CPU time): {phases}.")
    return "\n".join(lines)


def recipe_page() -> str:
    with contextlib.chdir(ROOT):  # the report names the JSON by the path it is given
        body = recipe.report(f"{BENCH}/recipe.json")
    return (f"<!-- generated by `python -m gammaray.app.docs` from {BENCH}/recipe.json: do not edit -->\n\n"
            "# `gammaray bench recipe`: every table\n\n"
            "The study and its reading are on the [benchmarks page](../benchmarks.md#which-loss-at-which-batch-gammaray-bench-recipe).\n\n"
            f"{body}\n")


def recipe_verdict() -> str:
    return "\n".join(f"- {line}" for line in recipe.verdict(load("recipe.json")["rows"]))


def config_reference() -> str:
    rows = describe()
    out = ["<!-- generated by `python -m gammaray.app.docs` from gammaray/config/: do not edit -->", "",
           "# Configuration key reference", "",
           "Every key of the config tree, its default and what it means, from the `description` of each field "
           "in `gammaray/config/` (the same text as `gammaray config reference`). Override any key with "
           "`--set a.b=c`; see [configuration](configuration.md).", ""]
    for section in dict.fromkeys(path.split(".")[0] for path, _, _ in rows):
        out += [f"## `{section}`", "", "| key | default | description |", "|---|---|---|"]
        out += [f"| `{path}` | `{cell(default)}` | {cell(desc)} |" for path, default, desc in rows
                if path.split(".")[0] == section]
        out.append("")
    return "\n".join(out)


BLOCKS = {
    "synthetic": lambda: synthetic_table("synthetic"),
    "synthetic-clip": lambda: synthetic_table("synthetic-clip"),
    "batch": batch_table,
    "structure": lambda: structure_table("structure"),
    "structure-clip": lambda: structure_table("structure_clip"),
    "tune-structure": tune_structure_table,
    "tune-structure-openclipart": lambda: tune_structure_table("tune-structure-openclipart"),
    "scale": scale_table,
    "recipe-verdict": recipe_verdict,
    "gpu-check": gpu_check_table,
    "gpu-step": gpu_step_table,
    "gpu-towers": gpu_towers_table,
    "prepare-stream": lambda: measured_table("prepare-stream"),
    "image-max-side": lambda: measured_table("image-max-side"),
    "cores-per-gpu": cores_per_gpu_table,
    "demo": lambda: demo_runs.readme_block(load("demo.json")),
    "demo-cause": lambda: demo_runs.cause_table(load("demo-cause.json")),
    "search": lambda: search.markdown(load("search.json")),
    "step-bench": step_table,
    "step-summary": step_summary,
    **{name: (lambda name=name: transcribed_table(name)) for name in TRANSCRIBED},
}


def cluster_guide() -> str:
    """infra/README.md stays beside the files it describes; the site shows a copy."""
    text = (ROOT / "infra" / "README.md").read_text()
    title, rest = text.split("\n", 1)
    return (f"<!-- generated by `python -m gammaray.app.docs` from infra/README.md: do not edit -->\n\n{title}\n\n"
            "*This page is `infra/README.md` of the repository; file paths in it are relative to `infra/`. "
            "The overview is [cluster operations](operations.md).*\n" + rest)


GENERATED_FILES = {
    f"{BENCH}/recipe.md": recipe_page,
    "docs/config-reference.md": config_reference,
    "docs/cluster-guide.md": cluster_guide,
}


def fill_blocks(page: str, where: str) -> str:
    def body(m: re.Match) -> str:
        name = m["name"]
        if name not in BLOCKS:
            raise KeyError(f"{where}: unknown generated block {name!r} (known: {', '.join(sorted(BLOCKS))})")
        return (f"<!-- generated: {name} (by `python -m gammaray.app.docs`: do not edit) -->\n"
                f"{BLOCKS[name]().strip()}\n<!-- end generated -->")
    return BLOCK.sub(body, page)


def pages(root: Path = ROOT) -> list[Path]:
    """The pages that may hold generated blocks: the README (its demo output) and every page under docs/."""
    readme = [root / "README.md"] if (root / "README.md").exists() else []
    return readme + sorted((root / "docs").rglob("*.md"))


def generated(root: Path = ROOT) -> dict[str, str]:
    """Every generated file and every page with a generated block -> its text as generated now."""
    out = {path: make() for path, make in GENERATED_FILES.items()}
    for page in pages(root):
        rel = page.relative_to(root).as_posix()
        if rel in out:
            continue
        text = page.read_text()
        if BLOCK.search(text):
            out[rel] = fill_blocks(text, rel)
    return out


def stale(root: Path = ROOT) -> list[str]:
    return [p for p, text in generated(root).items()
            if not (root / p).exists() or (root / p).read_text() != text]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m gammaray.app.docs", description=__doc__.split("\n\n")[0])
    p.add_argument("--check", action="store_true", help="write nothing; exit 1 if a generated part is stale")
    args = p.parse_args(argv)
    if args.check:
        bad = stale()
        for path in bad:
            print(f"stale: {path} (run python -m gammaray.app.docs)", file=sys.stderr)
        return 1 if bad else 0
    for path, text in generated().items():
        if not (ROOT / path).exists() or (ROOT / path).read_text() != text:
            (ROOT / path).write_text(text)
            print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
