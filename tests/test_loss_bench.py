"""`gammaray bench synthetic` and the data side of `gammaray bench batch`, at toy sizes: the exact
optimum, the stacked computation equal to separate runs, the JSON schema, the PNG, the clip-art parser
and the message when the package client is missing."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch

from gammaray.app.benchmarks import synthetic as syn

pytestmark = [pytest.mark.loss, pytest.mark.usefixtures("one_torch_thread")]


def test_theta_star_is_the_exact_full_data_optimum():
    x, y = syn.make_pairs(0, 400, 0.5)
    G = syn.log_ratio(torch.from_numpy(x), torch.from_numpy(y), 0.5)
    ts = syn.theta_star(G)
    th = torch.tensor(ts, dtype=torch.float64, requires_grad=True)
    (d1,) = torch.autograd.grad(syn.full_data_objective(th, G), th)
    assert abs(float(d1)) < 1e-8
    assert 0.8 < ts < 1.2                                   # near the population optimum 1
    # F_n is the mean over anchors of -s_ii + log mean_{j != i} exp(s_ij): check one value directly
    n = G.shape[0]
    S = 0.7 * G
    off = ~torch.eye(n, dtype=torch.bool)
    ref = (-S.diagonal() + torch.logsumexp(S.masked_fill(~off, -float("inf")), 1) - np.log(n - 1)).mean()
    assert abs(float(syn.full_data_objective(torch.tensor(0.7, dtype=torch.float64), G)) - float(ref)) < 1e-10


@pytest.mark.parametrize("method", ["infonce", "gamma", "sogclr", "infonce_clip"])
def test_stacked_blocks_equal_separate_runs(method):
    """Training several (rho, seed) blocks in one call gives each block exactly its own run."""
    cfg = syn.StudyConfig(n=40, epochs=2)
    blocks = [(0.5, 0), (0.9, 1)]
    xs, ys = zip(*[syn.make_pairs(s, 40, r) for r, s in blocks])
    both = syn.run_cell(blocks, list(xs), list(ys), 8, method, cfg)
    for k in range(2):
        alone = syn.run_cell([blocks[k]], [xs[k]], [ys[k]], 8, method, cfg)
        np.testing.assert_allclose(both[:, k], alone[:, 0], rtol=1e-10, atol=1e-12)


def test_bench_synthetic_cli_writes_the_schema_and_a_plot(tmp_path):
    from gammaray.app.cli import main

    out = tmp_path / "syn.json"
    rc = main(["bench", "synthetic", "--json", str(out), "--n", "60", "--seeds", "2", "--epochs", "2",
               "--rho", "0.5", "--batch-size", "8", "--quiet"])
    assert rc == 0
    data = json.loads(out.read_text())
    assert set(data) == {"population_theta_star", "results"} and data["population_theta_star"] == 1.0
    assert len(data["results"]) == 3 * 2
    for r in data["results"]:
        assert set(r) == {"method", "rho", "batch_size", "seed", "theta_final", "theta_star"}
        assert r["method"] in ("infonce", "gamma", "sogclr") and np.isfinite(r["theta_final"])
    assert (tmp_path / "syn.png").stat().st_size > 10_000
    with pytest.raises(SystemExit):
        main(["bench", "synthetic", "--json", str(out), "--methods", "nope"])


def _fake_openclipart(root: str) -> None:
    share = os.path.join(root, "openclipart", "root", "usr", "share", "openclipart")
    from PIL import Image

    items = [("animals", "cat_01", "Sleepy cat", ["cat", "pet"]), ("animals/birds", "owl_01", "Owl", ["bird"]),
             ("animals", "cat_02", "Sleepy cat", ["cat", "pet"]),    # same text as cat_01: dropped
             ("food", "apple_01", "", [])]                            # no title: from the file name
    for folder, name, title, tags in items:
        os.makedirs(os.path.join(share, "svg", folder), exist_ok=True)
        os.makedirs(os.path.join(share, "png", folder), exist_ok=True)
        lis = "".join(f"<rdf:li>{t}</rdf:li>" for t in tags)
        with open(os.path.join(share, "svg", folder, name + ".svg"), "w") as f:
            f.write(f'<svg><metadata><dc:title>{title}</dc:title><dc:subject><rdf:Bag>{lis}</rdf:Bag></dc:subject>'
                    f"<dc:title>Open Clip Art Library</dc:title></metadata></svg>")
        Image.new("RGB", (8, 8), (200, 10, 10)).save(os.path.join(share, "png", folder, name + ".png"))


def test_openclipart_records_parse_titles_tags_categories(tmp_path):
    from gammaray.app.benchmarks.batch import openclipart_records

    _fake_openclipart(str(tmp_path))
    train, val = openclipart_records(str(tmp_path), n_val=1, seed=0)
    recs = sorted(train + val, key=lambda r: r["product_id"])
    assert [r["title"] for r in recs] == ["Owl", "Sleepy cat", "apple 01"]
    assert [r["category"] for r in recs] == ["animals > birds", "animals", "food"]
    assert recs[1]["description"] == "cat, pet" and recs[0]["image"][:4] == b"\x89PNG"
    assert len(val) == 1


def test_openclipart_without_apt_get_is_skipped_with_a_message(tmp_path, monkeypatch):
    from gammaray.app.benchmarks.batch import Unavailable, fetch_openclipart

    monkeypatch.setenv("PATH", str(tmp_path))                # a machine without the Debian client
    with pytest.raises(Unavailable, match="apt-get.*not found"):
        fetch_openclipart(str(tmp_path / "cache"))
