"""`gammaray bench ingest`: registered in the shared dispatcher, documented, and its data-stall
arithmetic right (the benchmark itself is too slow for a timed test; its figures are in the README)."""

from __future__ import annotations

import pytest

from pipelines.benchmarks.ingest import format_table, stall_from_metrics

pytestmark = pytest.mark.ingest


def test_bench_ingest_is_a_documented_subcommand(capsys):
    from gammaray.cli import build_parser
    from gammaray.commands.bench import BENCHES, bench_parser

    assert BENCHES["ingest"] == "pipelines.benchmarks.ingest"
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
