"""`gammaray bench ingest`: registered in the shared dispatcher, documented, and its data-stall
arithmetic right (the benchmark itself is too slow for a timed test; its figures are on the docs benchmarks page)."""

from __future__ import annotations

import json

import pytest

from gammaray.app.benchmarks.ingest import format_table, stall_from_metrics

pytestmark = pytest.mark.ingest


def test_bench_ingest_is_a_documented_subcommand(capsys):
    from gammaray.app.cli import build_parser
    from gammaray.app.commands.bench import BENCHES, bench_parser

    assert BENCHES["ingest"] == "gammaray.app.benchmarks.ingest"
    args = build_parser().parse_args(["bench", "ingest", "--json", "x.json", "--cores", "3"])
    assert (args.what, args.bench_args) == ("ingest", ["--json", "x.json", "--cores", "3"])
    parser, _ = bench_parser("ingest")
    with pytest.raises(SystemExit):
        parser.parse_args(["--help"])
    out = capsys.readouterr().out
    for opt in ("--json", "--records", "--cores", "--rounds", "--train-steps", "--storage", "--set"):
        assert opt in out
    bench_args = parser.parse_args(args.bench_args)
    assert (bench_args.json, bench_args.cores) == ("x.json", 3)


def test_stall_fraction_is_wall_time_weighted_and_skips_the_first_window():
    lines = [
        {"step": 5, "data_wait_fraction": 0.8, "step_time_s": 2.0},     # cold start: 10 s, 80 % waiting
        {"step": 10, "data_wait_fraction": 0.0, "step_time_s": 0.2},    # 1 s
        {"step": 15, "data_wait_fraction": 0.3, "step_time_s": 0.6},    # 3 s, an epoch start
        {"step": 15, "final": 1, "data_wait_fraction": 0.9, "step_time_s": 9.0},
    ]
    s = stall_from_metrics(lines)
    assert s["data_stall_fraction"] == pytest.approx((0.0 * 1 + 0.3 * 3) / 4)
    assert s["data_stall_fraction_incl_start"] == pytest.approx((0.8 * 10 + 0.9) / 14)
    assert s["data_stall_first_window"] == 0.8 and s["data_stall_windows"] == [0.8, 0.0, 0.3]
    assert stall_from_metrics([]) == {}


def test_the_summary_table_shows_all_figures():
    r = {"records": 4096, "cores": 2, "image_side": 96, "image_size": 64, "augmented_views": True,
         "rounds": {"limit": [1, 2, 3]}, "gammaray_records_per_s": 900.0, "dataloader_records_per_s": 850.0,
         "limit_records_per_s": 1000.0, "gammaray_vs_limit": 0.9, "gammaray_vs_dataloader": 1.06,
         "data_stall_fraction": 0.01, "data_stall_fraction_incl_start": 0.2, "train_step_time_s": 0.3}
    text = format_table(r)
    assert "90% of limit" in text and "1.06x DataLoader" in text and "0.010" in text


def test_bench_decode_reports_cost_per_kind_and_scans_a_collection(tmp_path):
    """`gammaray bench decode` (figures on the docs benchmarks page): one round, and a scan of a small folder with a
    transparent cut-out, an opaque PNG and a decompression bomb."""
    from gammaray.app.commands.bench import BENCHES, bench_parser
    from pipelines import faults, image_kinds
    from gammaray.app.benchmarks import decode as bench

    assert BENCHES["decode"] == "gammaray.app.benchmarks.decode"
    (tmp_path / "imgs").mkdir()
    (tmp_path / "imgs" / "cutout.png").write_bytes(image_kinds.rgba_cutout())
    (tmp_path / "imgs" / "opaque.png").write_bytes(image_kinds.png(image_kinds.Image.new("RGB", (8, 8), (9, 9, 9))))
    (tmp_path / "imgs" / "bomb.png").write_bytes(faults.decompression_bomb())
    parser, _ = bench_parser("decode")
    args = parser.parse_args(["--rounds", "1", "--images", str(tmp_path / "imgs"), "--json", str(tmp_path / "d.json")])
    assert bench.run(args) == 0
    out = json.loads((tmp_path / "d.json").read_text())
    kinds = {c["kind"]: c for c in out["cpu_ms_per_image"]}
    assert kinds["RGBA cut-out PNG 256 px"]["conversions"] == ["transparency"] and len(kinds) == 8
    assert all(c["plain_ms"] > 0 and c["decode_ms"] > 0 for c in kinds.values())
    scan = out["scan"]
    assert (scan["images"], scan["conversions"], scan["rejected"]) == (3, {"transparency": 1}, {"image_too_large": 1})
    assert scan["plain_colour_under_alpha_0"] == {str(image_kinds.HIDDEN): 1}


def test_bench_scale_rows_and_growth(tmp_path):
    """`gammaray bench scale` on a synthetic manifest of 20k records (the index-only pieces, seconds):
    every row has the committed schema, the growth fit and the docs table read them, and the
    committed docs/bench/scale.json has the same schema and every metric the issue names."""
    import argparse
    import os

    from gammaray.app.benchmarks import scale
    from gammaray.app.commands.bench import BENCHES

    assert BENCHES["scale"] == "gammaray.app.benchmarks.scale"
    p = argparse.ArgumentParser()
    scale.add_arguments(p)
    args = p.parse_args(["--sizes", "", "--manifest-sizes", "20000", "--workers", "4", "--workdir", str(tmp_path)])
    rows = scale.measure(args)
    assert {r["metric"] for r in rows} == {"plan_setup_s", "plan_setup_mb", "embed_setup_s"}
    for r in rows:
        assert set(scale.ROW_KEYS) <= set(r) and r["n"] == 20000 and r["measured"] is True and r["value"] >= 0
    assert scale.growth([{"n": 10, "metric": "m", "value": 1.0}, {"n": 1000, "metric": "m", "value": 100.0}], "m") == 1.0
    assert "`plan_setup_s` (s)" in scale.markdown(rows)

    committed = json.load(open(os.path.join(os.path.dirname(__file__), "..", "docs", "bench", "scale.json")))
    assert {"prepare_peak_rss_mb", "prepare_records_per_s", "first_batch_s", "first_batch_after_resume_s",
            "plan_setup_s", "plan_setup_mb", "embed_setup_s", "tokenizer_s"} <= {r["metric"] for r in committed}
    assert all(set(scale.ROW_KEYS) <= set(r) for r in committed)
    assert all("cpus" in r for r in committed if r["metric"] == "prepare_records_per_s")
