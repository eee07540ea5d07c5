"""hcd data-check: counts per split, every bad file named, exit code 2 when any."""
import shutil

import pytest

from hcd.engine.cli import main
from hcd.engine.data.check import run_data_check
from hcd.engine.errors import DataError

from .jpegs import jpeg_with_garbage_body, truncated_jpeg


def test_clean_dataset(dataset, capsys):
    assert run_data_check(dataset, workers=2) == 0
    out = capsys.readouterr().out
    assert "train: 30 images in 3 classes" in out and "val: 12 images in 3 classes" in out
    assert run_data_check(dataset / "val") == 0      # a single split folder works too
    assert "12 images in 3 classes" in capsys.readouterr().out


def test_bad_files_named(dataset_copy, capsys):
    ant = dataset_copy / "train" / "ant"
    planted = [ant / "body.jpg", ant / "trunc.jpg", ant / "notes.txt", dataset_copy / "val" / "bee" / "x.png",
               dataset_copy / "train" / "stray.jpg"]
    jpeg_with_garbage_body(planted[0])
    truncated_jpeg(planted[1], next(ant.glob("img*.jpg")))
    planted[2].write_text("labels are in the folder names")
    planted[3].write_bytes(b"")
    planted[4].write_bytes(b"")
    (dataset_copy / "train" / "empty").mkdir()
    wasp = dataset_copy / "val" / "wasp"  # decodable images, but a class train does not have
    wasp.mkdir()
    shutil.copy(next((dataset_copy / "val" / "ant").glob("*.jpg")), wasp / "w.jpg")
    assert run_data_check(dataset_copy, workers=2) == 2
    out = capsys.readouterr().out
    for p in planted + [dataset_copy / "train" / "empty"]:
        assert f"BAD {p}:" in out
    assert f"BAD {wasp}: class folder not among the train classes" in out
    assert out.count("BAD ") == len(planted) + 2
    assert " 0x" not in out and "<bytes" not in out  # no object addresses in the reasons
    assert "train: 30 images in 4 classes" in out


def test_missing_folder(tmp_path, capsys):
    with pytest.raises(DataError, match="nowhere"):
        run_data_check(tmp_path / "nowhere")
    assert main(["data-check", str(tmp_path / "nowhere")]) == 2
    err = capsys.readouterr().err
    assert "nowhere" in err and err.count("\n") == 1
