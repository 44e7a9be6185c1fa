"""`gammaray eval` on a checkpoint against the held-out catalogue in S3 (real Ray Data, real
SeaweedFS): every metric is there, equals the value computed record by record without Ray, and the
in-training evaluation gives the same numbers (one code path)."""

from __future__ import annotations

import json

import pytest
import torch

from tests.eval_support import direct_embeddings, make_checkpoint, read_catalogue
from workers.evaluation.metrics import modality_gap, retrieval_metrics, zero_shot_accuracy

pytestmark = pytest.mark.eval


@pytest.mark.timeout(300)
def test_eval_command_metrics_probes_report(ray_local, small_catalogue, tmp_path):
    from gammaray.app.cli import main
    from pipelines.tokenizer import load as load_tokenizer
    from workers.evaluation.evaluate import encode_prompts, evaluate
    from workers.models.registry import load_model

    ckpt, cfg = make_checkpoint(str(tmp_path), small_catalogue)
    out = tmp_path / "eval.json"
    mlflow_uri = f"sqlite:///{tmp_path}/mlflow.db"
    rc = main(["eval", "--checkpoint", ckpt, "--data", small_catalogue["val"], "--json", str(out),
               "--set", "eval.prompt_template=a product in {}", "--set", "eval.k_shots=[1,5,10]",
               "--set", "tracking.kind=mlflow", "--set", f"tracking.uri={mlflow_uri}"])
    assert rc == 0
    s = json.loads(out.read_text())
    m = s["metrics"]
    assert m["records"] == 96

    # tracked: one MLflow run with the metrics and the report JSON + PNG as artifacts
    from mlflow.tracking import MlflowClient

    client = MlflowClient(mlflow_uri)
    (run,) = client.search_runs([client.get_experiment_by_name("gammaray").experiment_id])
    assert run.data.tags["gammaray.job"] == "eval" and run.data.tags["checkpoint_uri"] == ckpt
    assert run.data.metrics["r_at_1_i2t"] == pytest.approx(m["r_at_1_i2t"])
    assert sorted(a.path for a in client.list_artifacts(run.info.run_id)) == ["eval.json", "eval.png"]

    # the same numbers from embeddings computed record by record, without Ray
    model = load_model(f"{ckpt}/model").eval()
    rows = read_catalogue(small_catalogue["val"])
    ref = direct_embeddings(model, cfg, rows)
    image, text = torch.from_numpy(ref["image"]), torch.from_numpy(ref["text"])
    expect = retrieval_metrics(image, text)
    for k in (1, 5, 10):
        for d in ("i2t", "t2i"):
            assert m[f"r_at_{k}_{d}"] == pytest.approx(expect[f"r_at_{k}_{d}"], abs=1e-12)
    assert m["modality_gap"] == pytest.approx(modality_gap(image, text), abs=1e-5)
    classes = sorted(set(rows["category"]))
    tok = load_tokenizer(f"{ckpt}/model/text_tower")
    cfg_p = cfg.model_copy(update={"eval": cfg.eval.model_copy(update={"prompt_template": "a product in {}"})})
    class_text = encode_prompts(model, tok, [f"a product in {c}" for c in classes], cfg_p, torch.device("cpu"))
    labels = torch.tensor([classes.index(c) for c in rows["category"]])
    assert m["zero_shot_acc"] == pytest.approx(zero_shot_accuracy(image, class_text, labels), abs=1e-12)
    assert m["zero_shot_chance"] == pytest.approx(1 / 6)

    # probes: category and the eight attributes, on both embeddings, linear + 1/5/10-shot + chance
    probes = {(p["embedding"], p["label"]): p for p in s["probes"]}
    labels_expected = {"category"} | {f"attr:{a}" for a in ("colour", "product", "pattern", "size", "material", "brand",
                                                            "care", "warranty")}
    assert set(probes) == {(e, lab) for e in ("image", "text") for lab in labels_expected}
    for p in probes.values():
        assert p["n_train"] + p["n_test"] == 96
        for key in ("linear", "k1", "k5", "k10", "chance"):
            assert 0.0 <= p[key] <= 1.0
    assert "probe_text_attr_brand_linear" in m

    # the PNG report next to the JSON
    png = tmp_path / "eval.png"
    assert s["report"] == str(png)
    data = png.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 20_000

    # in-training validation (what checkpoint ranking and Tune read) is this same code without the
    # probes: the training loop calls workers.evaluation.evaluate.evaluate = run_evaluation(full=False)
    import workers.training.loop

    assert workers.training.loop.evaluate is evaluate


def test_eval_rejects_a_folder_without_a_model(tmp_path):
    from gammaray.app.cli import main

    (tmp_path / "empty").mkdir()
    assert main(["eval", "--checkpoint", str(tmp_path / "empty"), "--data", str(tmp_path), "--report", ""]) == 1


@pytest.mark.parametrize("command", ["eval", "embed", "export"])
def test_every_option_has_help(command, capsys):
    from gammaray.app.cli import build_parser

    parser = build_parser()
    sub = next(a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction").choices[command]
    for action in sub._actions:
        if action.dest != "help":
            assert action.help, f"{command} {action.option_strings or action.dest} has no help text"
    with pytest.raises(SystemExit):
        parser.parse_args([command, "--help"])
    out = capsys.readouterr().out
    for action in sub._actions:
        for opt in action.option_strings:
            assert opt in out
