"""Config loading: YAML + dotted overrides; every bad input is a ConfigError naming the key path."""
import subprocess
import sys
from pathlib import Path

import pytest

from hcd.engine.config import Config, ConfigError, dump_config, load_config, with_absolute_paths

ROOT = Path(__file__).resolve().parents[2]


def test_defaults_follow_the_spec():
    cfg = load_config()
    assert cfg.loss.n_sublogits == 4 and cfg.loss.sublogit_kl_weight == 6.0 and cfg.loss.label_smoothing == 0.1
    assert cfg.head.stages == [1, 2, 3, 4] and cfg.loss.detach_sublogit_target is False


def test_every_shipped_config_loads():
    files = sorted((ROOT / "configs").rglob("*.yaml"))
    assert any(f.name == "demo.yaml" for f in files)
    for f in files:
        assert isinstance(load_config(str(f)), Config), f


def test_yaml_and_overrides(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("optim:\n  lr: 1\nloss:\n  temperature: 4\nmodel:\n  teacher_kwargs: {depth: 2}\n")
    cfg = load_config(str(f), ("optim.lr=0.3", "loss.detach_sublogit_target=true", "model.teacher_kwargs.img_size=32"))
    assert cfg.optim.lr == 0.3 and isinstance(cfg.loss.temperature, float) and cfg.loss.temperature == 4.0
    assert cfg.loss.detach_sublogit_target is True
    assert cfg.model.teacher_kwargs == {"depth": 2, "img_size": 32}


def test_round_trip_through_dump(tmp_path):
    cfg = load_config(None, ("seed=7", "head.stages=[2,3]"))
    dump_config(cfg, tmp_path / "config.yaml")
    assert load_config(str(tmp_path / "config.yaml")) == with_absolute_paths(cfg)  # the same, paths absolute


@pytest.mark.parametrize("override,key", [
    ("optim.lrr=1", "optim.lrr"),
    ("nope=1", "nope"),
    ("train.epochs=abc", "train.epochs"),
    ("train.epochs=1.5", "train.epochs"),
    ("loss.temperature=hot", "loss.temperature"),
    ("loss.n_sublogits=0", "loss.n_sublogits"),
    ("loss.detach_sublogit_target=3", "loss.detach_sublogit_target"),
    ("data.loader=ffcv", "data.loader"),
    ("data.batch_size=0", "data.batch_size"),
    ("head.stages=[0,5]", "head.stages"),
    ("head.stages=[4,2]", "head.stages"),   # the student returns features in network order
    ("head.stages=[2,2]", "head.stages"),
    ("optim.betas=[2,3]", "optim.betas"),
    ("optim.betas=[a,b]", "optim.betas"),
    ("=3", "--set =3: no key"),
    ("foo.bar=1", "foo: unknown key"),
    ("deepspeed.zero_stage=4", "deepspeed.zero_stage"),
    ("optim.lr=-1", "optim.lr"),
    ("seed.x=1", "seed"),
    ("optim", "--set optim"),
    ("schedule.update=hourly", "schedule.update"),
    ("schedule.warmup_lr=-1", "schedule.warmup_lr"),
    ("data.train_interpolation=nearest", "data.train_interpolation"),
])
def test_bad_overrides_name_the_key(override, key):
    with pytest.raises(ConfigError, match=rf"^{key}"):
        load_config(None, (override,))


def test_bad_files(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(str(tmp_path / "missing.yaml"))
    (tmp_path / "bad.yaml").write_text("optim: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(str(tmp_path / "bad.yaml"))
    (tmp_path / "list.yaml").write_text("- 1\n")
    with pytest.raises(ConfigError, match="top level"):
        load_config(str(tmp_path / "list.yaml"))
    (tmp_path / "sec.yaml").write_text("optim: 3\n")
    with pytest.raises(ConfigError, match="^optim"):
        load_config(str(tmp_path / "sec.yaml"))


def test_a_retired_schedule_key_names_its_replacement(tmp_path):
    # an older run's saved config.yaml: one line naming the key and what replaced it, not "unknown key"
    (tmp_path / "old.yaml").write_text("schedule:\n  name: cosine\n  warmup_start_factor: 0.01\n")
    for args in ((str(tmp_path / "old.yaml"),), (None, ("schedule.warmup_start_factor=0.01",))):
        with pytest.raises(ConfigError) as e:
            load_config(*args)
        assert str(e.value).startswith("schedule.warmup_start_factor: replaced by schedule.warmup_lr")
        assert "\n" not in str(e.value)


def test_cli_prints_one_line_and_exits_2(tmp_path):
    (tmp_path / "c.yaml").write_text("train:\n  epochs: many\n")
    r = subprocess.run([sys.executable, "-m", "hcd.engine.cli", "train", "--config", str(tmp_path / "c.yaml"),
                        "--out", str(tmp_path / "run")], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 2
    assert r.stderr.strip().count("\n") == 0 and "train.epochs" in r.stderr
    assert not (tmp_path / "run").exists()


def test_cli_help_lists_every_subcommand():
    r = subprocess.run([sys.executable, "-m", "hcd.engine.cli", "--help"], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0
    for cmd in ("train", "eval", "verify", "bench", "data-check", "demo", "plot"):
        assert cmd in r.stdout


def test_a_saved_config_works_from_another_directory(tmp_path, monkeypatch):
    work, elsewhere = tmp_path / "work", tmp_path / "elsewhere"
    (work / "runs" / "x").mkdir(parents=True)
    elsewhere.mkdir()
    (work / "runs" / "x" / "teacher.safetensors").write_bytes(b"")
    (work / "ds.json").write_text("{}")
    monkeypatch.chdir(work)
    cfg = load_config(None, ("model.teacher_checkpoint=runs/x/teacher.safetensors", "data.root=data",
                             "deepspeed.config_file=ds.json", "out=runs/x", "data.train_list=train.txt"))
    dump_config(cfg, work / "runs" / "x" / "config.yaml")
    monkeypatch.chdir(elsewhere)
    saved = load_config(str(work / "runs" / "x" / "config.yaml"))
    assert Path(saved.model.teacher_checkpoint) == work / "runs" / "x" / "teacher.safetensors"
    assert Path(saved.model.teacher_checkpoint).is_file() and Path(saved.deepspeed.config_file).is_file()
    assert (saved.data.root, saved.out) == (str(work / "data"), str(work / "runs" / "x"))
    assert saved.data.train_list == "train.txt" and saved.model.student_checkpoint is None  # relative to root


def test_compiling_the_student_under_zero3_is_refused():
    load_config(None, ("train.compile=student", "deepspeed.zero_stage=2"))
    load_config(None, ("train.compile=teacher", "deepspeed.zero_stage=3"))
    with pytest.raises(ConfigError, match=r"^train\.compile: 'all' with deepspeed.zero_stage 3"):
        load_config(None, ("train.compile=all", "deepspeed.zero_stage=3"))
