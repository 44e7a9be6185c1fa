"""The config tree: YAML + dotted overrides, clear errors before any cluster resource is used."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest
import yaml

from gammaray.config import ConfigError, GammarayConfig, apply_overrides, describe, get_value, load, to_yaml

pytestmark = pytest.mark.foundation
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_defaults_are_valid_and_roundtrip_through_yaml(tmp_path):
    cfg = GammarayConfig()
    p = tmp_path / "c.yaml"
    p.write_text(to_yaml(cfg))
    assert load(p) == cfg


def test_shipped_demo_config_equals_the_embedded_defaults():
    assert load(os.path.join(ROOT, "configs", "demo.yaml")) == GammarayConfig()


def test_every_shipped_config_loads():
    names = sorted(n for n in os.listdir(os.path.join(ROOT, "configs")) if n.endswith(".yaml"))
    assert "random-towers.yaml" in names and len(names) >= 6
    for name in names:
        load(os.path.join(ROOT, "configs", name))  # raises ConfigError naming the file and key


def test_get_value_reads_what_apply_overrides_wrote():
    cfg = apply_overrides(GammarayConfig(), {"loss.gamma.alpha": 2.5, "model.text.hf_config.hidden_size": 48})
    assert get_value(cfg, "loss.gamma.alpha") == 2.5
    assert get_value(cfg, "model.text.hf_config.hidden_size") == 48  # inside a dict-valued key
    assert get_value(cfg, "train") == cfg.train
    with pytest.raises(ConfigError, match="loss.gama.alpha: unknown key 'gama'"):
        get_value(cfg, "loss.gama.alpha")
    with pytest.raises(ConfigError, match="no key 'nope'"):
        get_value(cfg, "model.text.hf_config.nope")


def test_dotted_overrides_are_typed_by_yaml():
    cfg = load(overrides=["loss.gamma.alpha=2", "train.workers=4", "loss.kind=infonce",
                          "model.image.hf_config.depths=[2, 2, 2]", "data.augment.crop_scale=[0.5, 1.0]"])
    assert cfg.loss.gamma.alpha == 2.0
    assert cfg.train.workers == 4 and isinstance(cfg.train.workers, int)
    assert cfg.loss.kind == "infonce"
    assert cfg.model.image.hf_config["depths"] == [2, 2, 2]
    assert cfg.data.augment.crop_scale == (0.5, 1.0)


def test_mapping_overrides_work_like_tune_param_spaces():
    cfg = apply_overrides(GammarayConfig(), {"loss.structure.lambda_br": 0.3, "loss.gamma.gamma": 0.5})
    assert cfg.loss.structure.lambda_br == 0.3 and cfg.loss.gamma.gamma == 0.5


@pytest.mark.parametrize(
    "override, needle",
    [
        ("loss.gama.alpha=2", "unknown key 'gama' in loss (did you mean 'gamma'?)"),
        ("train.wrokers=2", "did you mean 'workers'"),
        ("train.workers=abc", "train.workers"),
        ("loss.kind=contrastive", "loss.kind"),
        ("loss.gamma.gamma=1.5", "loss.gamma.gamma"),
        ("train.epochs.x=1", "is a value"),
        ("no_equals_sign", "dotted.path=value"),
    ],
)
def test_bad_overrides_name_the_path(override, needle):
    with pytest.raises(ConfigError) as err:
        load(overrides=[override])
    assert needle in str(err.value)


def test_moved_keys_are_read_under_their_old_names_with_a_warning(tmp_path):
    """precision, accumulation and clipping moved from train.deepspeed to train (every engine uses
    them): old YAML, --set paths and Tune spaces keep working, and a checkpoint whose run identity
    names the old key resumes under the new one."""
    from workers.training.resume import differences

    f = tmp_path / "old.yaml"
    f.write_text("train:\n  deepspeed:\n    zero_stage: 2\n    precision: bf16\n    gradient_clipping: 0.5\n")
    with pytest.warns(FutureWarning, match=r"train.deepspeed.precision is now train.precision"):
        cfg = load(str(f))
    assert (cfg.train.precision, cfg.train.gradient_clipping, cfg.train.deepspeed.zero_stage) == ("bf16", 0.5, 2)
    with pytest.warns(FutureWarning, match="train.gradient_accumulation_steps"):
        cfg = apply_overrides(GammarayConfig(), ["train.deepspeed.gradient_accumulation_steps=4"])
    assert cfg.train.gradient_accumulation_steps == 4
    with pytest.warns(FutureWarning):
        assert get_value(cfg, "train.deepspeed.gradient_accumulation_steps") == 4
    new = {"catalogue_sha256": "x", "catalogue_records": 1, "train.gradient_accumulation_steps": 4}
    old = {"catalogue_sha256": "x", "catalogue_records": 1, "train.deepspeed.gradient_accumulation_steps": 4}
    assert differences(old, new) == []
    assert differences({**old, "train.deepspeed.gradient_accumulation_steps": 2}, new) == [
        "train.gradient_accumulation_steps was 2, now 4"]


def test_unknown_key_in_yaml_is_an_error(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text(yaml.safe_dump({"train": {"workers": 2, "worker_count": 3}}))
    with pytest.raises(ConfigError, match=r"train.worker_count: unknown key"):
        load(p)


def test_inconsistent_image_size_is_rejected():
    with pytest.raises(ConfigError, match="image_size"):
        load(overrides=["model.image.hf_config={model_type: vit, image_size: 32}"])


def test_every_leaf_is_documented():
    rows = describe()
    undocumented = [path for path, _, desc in rows if not desc and not path.endswith(("flip", "betas"))]
    assert len(rows) > 40
    assert len(undocumented) < 15, undocumented


def test_cli_rejects_bad_config_before_starting_anything():
    env = dict(os.environ, PYTHONPATH=ROOT)
    t0 = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "gammaray.app.cli", "pretrain", "--set", "loss.gama.alpha=2"],
                          capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 2
    assert "unknown key 'gama'" in proc.stderr
    assert "ray" not in proc.stdout.lower()
    assert time.monotonic() - t0 < 60


def test_pretrain_without_data_fails_clearly():
    env = dict(os.environ, PYTHONPATH=ROOT)
    proc = subprocess.run([sys.executable, "-m", "gammaray.app.cli", "pretrain"], capture_output=True, text=True,
                          env=env, timeout=120)
    assert proc.returncode == 1
    assert "data.train is not set" in proc.stderr
