"""bench/gpu_check.sh and its helpers, as far as a machine without a GPU can check them: the scripts parse,
the train smoke command's overrides make a valid config, the JPEG folder and the metrics table come out right."""
import json
import re
import shlex
import subprocess
from pathlib import Path

from PIL import Image

from bench.train_smoke import main, metrics_table, write_jpeg_folder
from hcd.engine.config import load_config

ROOT = Path(__file__).resolve().parents[3]
GPU_CHECK = ROOT / "bench" / "gpu_check.sh"


def test_scripts_are_valid_bash():
    for script in ("gpu_check.sh", "fetch_wheels.sh"):
        r = subprocess.run(["bash", "-n", str(ROOT / "bench" / script)], capture_output=True, text=True)
        assert r.returncode == 0, r.stderr


def test_gpu_check_runs_each_phase_under_a_limit():
    text = GPU_CHECK.read_text()
    for phase in ("phase verify 75 $PY -m hcd.engine.cli verify --quick",
                  "phase steps 150 $PY -m hcd.engine.cli bench --quick --only step",
                  "phase graph 60 $PY bench/graph_check.py --engine --json",
                  "phase train 170 $PY -m hcd.engine.cli train --config configs/imagenet/swin_tiny-resnet18.yaml",
                  "phase kernels 200 $PY -m hcd.engine.cli bench --quick --only kernel,profile"):
        assert phase in text, phase
    assert "--target /tmp/site" in text and ".whl/*.whl" in text


def test_train_smoke_overrides_make_a_valid_config(tmp_path):
    """The smoke run's --set list, with the script's variables filled in, loads as a config (keys and types)."""
    command = re.search(r"phase train 170 (.*?)\ncp ", GPU_CHECK.read_text(), re.S).group(1).replace("\\\n", " ")
    words = shlex.split(command.replace("$work", str(tmp_path)).replace("$(nproc)", "4"))
    sets = [words[i + 1] for i, w in enumerate(words) if w == "--set"]
    cfg = load_config(str(ROOT / words[words.index("--config") + 1]), tuple(sets))
    assert (cfg.model.num_classes, cfg.data.loader, cfg.train.max_steps, cfg.model.teacher_checkpoint) == (10, "torch", 60, None)
    assert cfg.data.root == str(tmp_path / "jpegs") and cfg.train.save_every_steps is None


def test_jpeg_folder_has_the_classes_and_counts(tmp_path):
    root = write_jpeg_folder(tmp_path / "jpegs", classes=3, train=2, val=1)
    for split, count in (("train", 2), ("val", 1)):
        folders = sorted(p.name for p in (root / split).iterdir())
        assert folders == ["c0", "c1", "c2"]
        files = list((root / split / "c1").glob("*.jpg"))
        assert len(files) == count
    with Image.open(files[0]) as im:
        assert im.mode == "RGB" and 240 <= min(im.size) and max(im.size) <= 288


def test_metrics_table_prints_train_and_eval_rows(tmp_path, capsys):
    rows = [{"kind": "teacher", "step": 0, "teacher_top1": 10.0},
            {"kind": "train", "step": 10, "epoch": 0.5, "loss": 9.0, "ce": 2.3, "kd": 0.1, "sce": 6.0, "skl": 0.4,
             "ol": 0.2, "lr": 0.01, "images_per_s": 2500.0},
            {"kind": "train", "step": 20, "epoch": 1.0, "loss": 8.0, "ce": 2.2, "kd": 0.1, "sce": 5.5, "skl": 0.1,
             "ol": 0.1, "lr": 0.02, "images_per_s": 2600.0},
            {"kind": "eval", "step": 20, "epoch": 1, "val_top1": 12.5, "val_top5": 50.0}]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    text = metrics_table(tmp_path)
    lines = text.splitlines()
    assert lines[0].split() == ["step", "epoch", "loss", "ce", "kd", "sce", "skl", "ol", "lr", "img/s"]
    assert lines[1].split()[:3] == ["10", "0.50", "9.0000"] and lines[2].split()[-1] == "2600.0"
    assert "student val top-1 12.50%" in lines[3] and lines[4] == "loss 9.0000 -> 8.0000: falling"
    assert main(["table", str(tmp_path)]) == 0 and "falling" in capsys.readouterr().out
    assert main(["nonsense"]) == 2


def test_graph_check_compares_and_refuses_cpu(capsys):
    """bench/graph_check.py (train.cuda_graph_loss on a GPU): its verdict is the largest relative difference of a
    step's loss against a tolerance, and without CUDA it says so (exit 2) instead of failing inside a capture."""
    from bench.graph_check import main as graph_main, verdict
    v = verdict([2.0, 1.0], [2.0, 1.01], 2e-2)
    assert abs(v["max_rel_diff"] - 0.01) < 1e-12 and v["equal"] and not verdict([1.0], [1.1], 2e-2)["equal"]
    if not __import__("torch").cuda.is_available():
        assert graph_main([]) == 2 and "need a GPU" in capsys.readouterr().err
