"""`hcd compare`: the statistics on hand-made numbers, skipping finished runs and resuming interrupted ones
(a fake trainer that records its calls), the argument errors, and one tiny real comparison."""
import json
import math
from pathlib import Path

import pytest

from hcd.engine import compare
from hcd.engine.cli import main


def _rows(top1s, top5s=None, images_per_s=(100.0, 300.0), teacher=95.0):
    rows = [{"kind": "teacher", "step": 0, "teacher_top1": teacher, "teacher_top5": 100.0}]
    rows += [{"kind": "train", "step": 10 * (i + 1), "loss": 1.0, "images_per_s": v} for i, v in enumerate(images_per_s)]
    rows.append({"kind": "train", "step": 25, "loss": 1.0, "images_per_s": 1e6, "partial": True})  # left out
    top5s = top5s or [min(100.0, t + 5) for t in top1s]
    rows += [{"kind": "eval", "epoch": e + 1, "step": 10 * (e + 1), "val_top1": a, "val_top5": b}
             for e, (a, b) in enumerate(zip(top1s, top5s))]
    return rows


def test_statistics_on_hand_made_numbers():
    assert compare.mean_std([90.0, 92.0, 94.0]) == (92.0, 2.0)          # sample std: sqrt((4 + 0 + 4) / 2)
    assert compare.mean_std([1.0, 2.0]) == (1.5, math.sqrt(0.5))
    assert compare.mean_std([7.0]) == (7.0, 0.0)
    r = compare.run_summary(_rows([50.0, 80.0, 70.0], [90.0, 99.0, 98.0]), wall_s=12.0)
    assert (r["best_top1"], r["last_top1"], r["best_top5"], r["last_top5"]) == (80.0, 70.0, 99.0, 98.0)
    assert r["images_per_s"] == 200.0 and r["wall_s"] == 12.0 and r["teacher_top1"] == 95.0
    assert r["curve"] == [[1, 50.0], [2, 80.0], [3, 70.0]]
    runs = {0: compare.run_summary(_rows([60.0, 90.0]), 10.0), 1: compare.run_summary(_rows([70.0, 92.0]), 20.0),
            2: compare.run_summary(_rows([94.0, 80.0]), 30.0)}
    s = compare.method_summary(runs)
    assert s["seeds"] == 3
    assert s["best_top1"] == [92.0, 2.0]                      # 90, 92, 94
    assert s["last_top1"][0] == pytest.approx(262 / 3)        # 90, 92, 80
    assert s["last_top1"][1] == pytest.approx(math.sqrt(((90 - 262 / 3) ** 2 + (92 - 262 / 3) ** 2
                                                          + (80 - 262 / 3) ** 2) / 2))
    assert s["wall_s"] == [20.0, 10.0]
    md = compare.markdown({"config": "c.yaml", "teacher": "vit", "student": "resnet18", "teacher_top1": 95.0,
                           "seeds": [0, 1, 2], "commit": "abc", "device": "cpu-2core", "wall_s": 60.0,
                           "summary": {"kd": s}, "runs": {"kd": runs}})
    assert "| kd | 3 | 92.00 ± 2.00 |" in md and "| kd | 2 | 94.00 |" in md


def test_config_difference_names_the_first_key():
    saved = {"seed": 0, "optim": {"lr": 0.1, "momentum": 0.9}, "model": {"student_kwargs": {"channels": [32]}}}
    assert compare.config_difference(saved, saved) is None
    assert compare.config_difference(saved, dict(saved, optim={"lr": 0.2, "momentum": 0.9})) == "optim.lr"
    assert compare.config_difference(saved, dict(saved, model={"student_kwargs": {}})) == "model.student_kwargs"


def test_method_list_parsing():
    assert compare.parse_methods("ce, kd,hcd") == ["ce", "kd", "hcd"]
    for bad, words in (("ce,foo", "unknown method 'foo'"), ("kd,kd", "listed twice"), (",", "no method")):
        with pytest.raises(ValueError, match=words):
            compare.parse_methods(bad)


@pytest.mark.parametrize("args, words", [
    (["--methods", "ce,bogus"], "argument --methods: unknown method 'bogus'"),
    (["--seeds", "0"], "argument --seeds: must be an integer >= 1"),
    (["--seeds", "two"], "argument --seeds: must be an integer >= 1"),
])
def test_argument_errors_are_one_line(args, words, capsys):
    with pytest.raises(SystemExit) as e:
        main(["compare", "--config", "any.yaml", *args])
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and "\n" not in err and words in err


def _config(tmp_path, teacher=True) -> str:
    ckpt = tmp_path / "teacher.pt"
    ckpt.write_bytes(b"x")
    p = tmp_path / "c.yaml"
    p.write_text("seed: 5\nmodel: {num_classes: 5%s}\ndata: {loader: synthetic}\n"
                 % (f", teacher_checkpoint: {ckpt}" if teacher else ""))
    return str(p)


class FakeTrainer:
    """Writes what a finished run leaves (or, for `stop`, a checkpoint and exit 3) and records its calls."""

    def __init__(self, stop=()):
        self.calls, self.stop = [], set(stop)

    def __call__(self, cfg, out, resume):
        self.calls.append((cfg.method, cfg.seed, resume))
        folder = Path(out)
        folder.mkdir(parents=True, exist_ok=True)
        if (cfg.method, cfg.seed) in self.stop:
            self.stop.discard((cfg.method, cfg.seed))
            (folder / "checkpoints").mkdir()
            (folder / "checkpoints" / "latest").write_text("step-3")
            (folder / "metrics.jsonl").write_text("")
            return 3
        top1 = 80.0 + cfg.seed + (5.0 if cfg.method == "hcd" else 0.0)
        (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in _rows([top1 - 10, top1])))
        for name in ("curves.png", "student.safetensors"):
            (folder / name).write_bytes(b"x")
        return 0


def test_finished_runs_are_skipped_and_interrupted_ones_resume(tmp_path, capsys):
    config, out = _config(tmp_path), tmp_path / "cmp"
    fake = FakeTrainer(stop={("hcd", 6)})
    code = compare.run_compare(config, ["ce", "hcd"], 2, out=str(out), runner=fake)
    assert code == 3 and fake.calls == [("ce", 5, False), ("ce", 6, False), ("hcd", 5, False), ("hcd", 6, False)]
    assert "rerun the same command to continue" in capsys.readouterr().out
    partial = json.loads((out / "compare.json").read_text())
    assert partial["summary"]["hcd"]["seeds"] == 1 and partial["summary"]["ce"]["seeds"] == 2
    # a run that stopped before its first checkpoint starts again (its leftovers removed)
    (out / "ce" / "seed-6" / "curves.png").unlink()
    (out / "ce" / "seed-6" / "student.safetensors").unlink()
    fake.calls.clear()
    assert compare.run_compare(config, ["ce", "hcd"], 2, out=str(out), runner=fake) == 0
    assert fake.calls == [("ce", 6, False), ("hcd", 6, True)]
    text = capsys.readouterr().out
    assert "[1/4] ce seed 5: finished earlier, skipped" in text and "[4/4] hcd seed 6: resuming" in text
    result = json.loads((out / "compare.json").read_text())
    assert result["summary"]["hcd"]["best_top1"] == [90.5, pytest.approx(math.sqrt(0.5))]
    assert result["summary"]["ce"]["last_top1"][0] == 85.5 and result["teacher_top1"] == 95.0
    assert "| hcd | 2 | 90.50 ± 0.71 |" in (out / "compare.md").read_text()
    assert (out / "compare.png").read_bytes()[:4] == b"\x89PNG"
    fake.calls.clear()
    assert compare.run_compare(config, ["ce", "hcd"], 2, out=str(out), runner=fake) == 0 and fake.calls == []


def test_a_random_teacher_is_refused_unless_ce_alone(tmp_path, capsys):
    config = _config(tmp_path, teacher=False)
    assert main(["compare", "--config", config, "--methods", "ce,kd", "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "model.teacher_checkpoint: not set" in err
    fake = FakeTrainer()
    assert compare.run_compare(config, ["ce"], 1, out=str(tmp_path / "o"), runner=fake) == 0
    assert fake.calls == [("ce", 5, False)]  # the config's seed first


def test_a_tiny_real_comparison_in_one_process(tmp_path, write_config, train_rows, capsys):
    """Two real comparisons in this process (DeepSpeed's process group made by the first run, reused by the
    second): the second run of the same (method, seed) reproduces the first exactly, so nothing leaks from one
    run into the next."""
    import timm
    import torch
    config = write_config(tmp_path)
    teacher = timm.create_model("vit_tiny_patch16_224", num_classes=5, img_size=32, patch_size=8, depth=2,
                                embed_dim=48, num_heads=2)
    torch.save(teacher.state_dict(), tmp_path / "teacher.pt")
    sets = ["--set", f"model.teacher_checkpoint={tmp_path / 'teacher.pt'}", "--set", "train.epochs=1",
            "--set", "train.max_steps=2"]
    for out in "ab":
        assert main(["compare", "--config", config, "--methods", "hcd", "--seeds", "1", "--out", str(tmp_path / out),
                     *sets]) == 0
    first, again = (train_rows(tmp_path / x / "hcd" / "seed-0") for x in "ab")
    assert [r["loss"] for r in first] == [r["loss"] for r in again] and len(first) == 2
    result = json.loads((tmp_path / "a" / "compare.json").read_text())
    assert result["summary"]["hcd"]["seeds"] == 1 and set(result["runs"]["hcd"]) == {"0"}
    assert (tmp_path / "a" / "compare.png").is_file() and (tmp_path / "a" / "compare.md").is_file()
    # the same folder with another recipe: refused, naming the field, before anything trains
    assert main(["compare", "--config", config, "--methods", "hcd", "--seeds", "1", "--out", str(tmp_path / "a"),
                 *sets, "--set", "optim.lr=0.5"]) == 2
    assert "hcd/seed-0 holds a run whose optim.lr differs" in capsys.readouterr().err


def test_subset_list_is_balanced_seeded_and_repeated(tmp_path):
    """The compare demo's labelled subset: K distinct images per class, each listed R times, the same list
    for the same arguments, written by prepare_digits from the name data.train_list gives."""
    from collections import Counter

    from hcd.engine.data.demo import build_digits, write_subset_list
    from hcd.engine.demo import prepare_digits
    root = build_digits(str(tmp_path / "digits"))
    path = write_subset_list(root, per_class=3, repeats=2)
    lines = path.read_text().splitlines()
    assert path.name == "train-3-per-class-x2.txt" and len(lines) == 60 and len(set(lines)) == 30
    assert Counter(line.split()[1] for line in set(lines)) == {str(c): 3 for c in range(10)}
    assert all((root / "train" / line.split()[0]).is_file() and line.split()[0].startswith(line.split()[1] + "/")
               for line in lines)
    path.unlink()
    assert write_subset_list(root, per_class=3, repeats=2).read_text().splitlines() == lines  # seeded
    with pytest.raises(ValueError, match="per_class"):
        write_subset_list(root, per_class=1000)
    cfg = compare.load_config(None, (f"data.root={root}", "data.train_list=train-4-per-class-x3.txt"))
    prepare_digits(cfg)  # no teacher named: only the list is written
    assert len((root / "train-4-per-class-x3.txt").read_text().splitlines()) == 120
