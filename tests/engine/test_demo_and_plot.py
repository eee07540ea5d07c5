"""`hcd demo` end to end on a shortened schedule, and `hcd plot` redrawing a run folder."""
import json

from hcd.engine.cli import main


def test_demo_runs_end_to_end_on_a_short_schedule(tmp_path, capsys):
    out = tmp_path / "demo"
    code = main(["demo", "--out", str(out), "--set", f"data.root={tmp_path / 'digits'}",
                 "--set", "train.teacher_epochs=1", "--set", "train.epochs=1", "--set", "train.max_steps=4"])
    assert code == 0
    text = capsys.readouterr().out
    assert "teacher val top-1:" in text and "student val top-1:" in text and "too easy" in text
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if r["kind"] == "train"][-1] == 4
    assert any(r["kind"] == "eval" for r in rows) and any(r["kind"] == "teacher" for r in rows)
    for name in ("curves.png", "student.safetensors", "config.yaml"):
        assert (out / name).is_file(), name
    assert len(list((tmp_path / "digits" / "train").iterdir())) == 10  # the digits folder, built offline


def test_plot_redraws_curves(tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    rows = [{"kind": "train", "step": s, "epoch": 1, "loss": 3.0 / s, "ce": 1.0 / s, "skl": 0.5} for s in (1, 2, 3)]
    rows += [{"kind": "eval", "epoch": 1, "step": 3, "val_top1": 40.0, "val_top5": 80.0}]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert main(["plot", str(run)]) == 0
    png = (run / "curves.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
    assert main(["plot", str(tmp_path / "empty")]) == 2
    assert "no metrics.jsonl" in capsys.readouterr().err
    # a damaged line in the middle is one line naming the file and the line, exit 2
    (run / "metrics.jsonl").write_text(json.dumps(rows[0]) + "\n{oops\n" + json.dumps(rows[1]) + "\n")
    assert main(["plot", str(run)]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "metrics.jsonl: line 2 is not valid JSON" in err


def test_demo_data_root_as_shipped_means_the_cache(tmp_path, monkeypatch):
    """demo.yaml's data.root stands for $HCD_CACHE/digits (build_digits(None)); a --set root is used as given."""
    import hcd.engine.data.demo as data_demo
    import hcd.engine.demo as demo
    seen = []

    class Stop(Exception):
        pass

    def fake_build(root):
        seen.append(root)
        raise Stop

    monkeypatch.setattr(data_demo, "build_digits", fake_build)
    for i, overrides in enumerate(((), (f"data.root={tmp_path / 'mine'}",))):
        try:
            demo.run_demo(out=str(tmp_path / f"out{i}"), overrides=overrides)
        except Stop:
            pass
    assert seen == [None, str(tmp_path / "mine")]
