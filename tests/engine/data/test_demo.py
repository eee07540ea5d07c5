"""The embedded digits dataset is written offline, once, as an ImageNet-style folder."""
from hcd.engine.data.demo import build_digits
from hcd.engine.data.folder import load_split


def test_digits_folder_builds_offline_and_is_reused(tmp_path, monkeypatch):
    monkeypatch.setenv("HCD_CACHE", str(tmp_path / "cache"))
    root = build_digits()
    assert root == tmp_path / "cache" / "digits"
    train, val = load_split(str(root), "train"), load_split(str(root), "val", classes=None)
    assert train.classes == val.classes == [str(c) for c in range(10)]
    assert len(train) + len(val) == 1797 and 340 <= len(val) <= 380          # 80/20, stratified
    assert all((val.labels == c).sum() >= 30 for c in range(10))
    from PIL import Image
    with Image.open(train.paths[0]) as im:
        assert im.size == (32, 32) and im.mode == "RGB" and im.format == "JPEG"
    stamp = (root / ".complete").stat().st_mtime_ns
    assert build_digits() == root and (root / ".complete").stat().st_mtime_ns == stamp   # reused
    assert not [p for p in root.parent.iterdir() if p.name.startswith(".digits.tmp")]   # no leftovers
