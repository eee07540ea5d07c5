"""`hcd demo`: the whole pipeline on the embedded digits data, on CPU in minutes.

1. write the digits JPEG folder (hcd.engine.data.demo.build_digits; cached),
2. train the small ViT teacher from scratch (no hub weights on this path) and save it,
3. distil the ResNet18 student with HCD through the real trainer (DeepSpeed, checkpoints, export, curves),
4. print teacher and student accuracy, the wall time, and what the numbers do (not) show.
"""
import json
import shutil
import time
from pathlib import Path

import torch

from hcd.engine.config import ConfigError, load_config

DEMO_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "demo.yaml"
DIGITS_ROOT = "~/.cache/hcd/digits"  # data.root of the digits configs: stands for $HCD_CACHE/digits
MARKER = ".hcd_demo"  # a run folder holding this was written by the demo and may be replaced by it

HONEST = ("Note: digits is too easy to show distillation gains. A ResNet18 trained with plain cross-entropy "
          "reaches 98.9-99.2 % on it (docs/method.md, Stability), at least as good as KD or HCD, and the gap to the teacher "
          "here comes from the short schedule and photo-style augmentation, not from the method. This demo "
          "proves the pipeline runs end to end, not the paper's accuracy claims.")


def _load_folder(folder: Path, classes):
    """All images of a small class-folder split as one uint8 tensor (N, 3, H, W) and int64 labels."""
    import numpy as np
    from PIL import Image
    images, labels = [], []
    for idx, name in enumerate(classes):
        for f in sorted((folder / name).iterdir()):
            images.append(np.asarray(Image.open(f).convert("RGB")))
            labels.append(idx)
    x = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).contiguous()
    return x, torch.tensor(labels)


def _train_teacher(cfg, path: Path) -> Path:
    """The teacher from scratch, saved to `path`: a plain PyTorch loop (AdamW, warmup + cosine, label smoothing) for
    cfg.train.teacher_epochs epochs on the digits train split held in memory, with +-2 px shifts as the only
    augmentation (the loaders' random-resized-crop and flips suit photos, not digits, and a weak teacher
    would make the distillation meaningless). Evaluated through the real val loader."""
    import timm
    import torch.nn.functional as F
    from timm.scheduler import CosineLRScheduler
    from tqdm import tqdm

    from hcd.engine.data import build_loaders
    from hcd.engine.evaluate import evaluate
    from hcd.engine.export import save_safetensors
    from hcd.engine.models import norm_stats

    torch.manual_seed(cfg.seed)
    model = timm.create_model(cfg.model.teacher, num_classes=cfg.model.num_classes, **cfg.model.teacher_kwargs)
    mean, std = norm_stats(model)
    train_loader, val_loader = build_loaders(cfg.data, mean, std, seed=cfg.seed)
    x_all, y_all = _load_folder(Path(cfg.data.root) / cfg.data.train_dir, train_loader.classes)
    if x_all.shape[-1] != cfg.data.img_size:
        x_all = F.interpolate(x_all.float(), size=cfg.data.img_size, mode="bilinear", align_corners=False)
    m, s = torch.tensor(mean).view(1, 3, 1, 1) * 255, torch.tensor(std).view(1, 3, 1, 1) * 255
    x_all = (x_all.float() - m) / s
    bs, n = cfg.data.batch_size, len(y_all)
    steps_per_epoch = n // bs
    epochs = cfg.train.teacher_epochs
    total, warm = epochs * steps_per_epoch, steps_per_epoch
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.05)
    # timm's per-update cosine: linear warm-up over the first epoch from lr / warm, then (warm-up prefixed) a
    # cosine from lr to 0 over the remaining steps; the teacher's schedule as it was before timm's replaced ours
    sched = CosineLRScheduler(opt, t_initial=max(1, total - warm), lr_min=0.0, warmup_t=warm,
                              warmup_lr_init=1e-3 / warm, warmup_prefix=True, t_in_epochs=False)
    loss_fn = torch.nn.CrossEntropyLoss(label_smoothing=cfg.loss.label_smoothing)
    g = torch.Generator().manual_seed(cfg.seed)
    bar = tqdm(total=total, desc="teacher", dynamic_ncols=True)
    model.train()
    for epoch in range(epochs):
        order = torch.randperm(n, generator=g)
        for k in range(steps_per_epoch):
            idx = order[k * bs:(k + 1) * bs]
            dx, dy = torch.randint(-2, 3, (2,), generator=g).tolist()
            images = torch.roll(x_all[idx], shifts=(dy, dx), dims=(2, 3))  # one shift per batch: cheap
            loss = loss_fn(model(images), y_all[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step_update(epoch * steps_per_epoch + k + 1)
            bar.update(1)
        bar.set_postfix(loss=f"{loss.item():.3f}")  # one host sync per epoch
    bar.close()
    model.eval()
    top1, top5, count = evaluate(model, val_loader, torch.device("cpu"), desc="teacher eval")
    print(f"teacher trained from scratch ({epochs} epochs): val top-1 {top1:.2f}%  top-5 {top5:.2f}%  "
          f"({count} images)", flush=True)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_safetensors({k: v.contiguous() for k, v in model.state_dict().items()}, path)  # atomic
    return path


def digits_root(root: str) -> Path:
    """The digits folder a config's data.root names, built if missing. The shipped configs' root
    (DIGITS_ROOT) means "the cache" ($HCD_CACHE/digits when set); any other root is used as given."""
    from hcd.engine.data.demo import build_digits
    return build_digits(None if root == DIGITS_ROOT else str(Path(root).expanduser()))


def prepare_digits(cfg) -> None:
    """What a digits config needs before `hcd compare` trains on it, made once and cached: the digits folder
    (data.root = DIGITS_ROOT), the labelled subset its data.train_list names (train-<K>-per-class-x<R>.txt) and,
    when model.teacher_checkpoint is missing and train.teacher_epochs > 0, the teacher trained from scratch
    on the whole train split (_train_teacher) and saved there. Sets cfg.data.root to the folder used."""
    import re

    from hcd.engine.data.demo import SUBSET_LIST, write_subset_list
    root = digits_root(cfg.data.root)
    cfg.data.root = str(root)
    pattern = re.escape(SUBSET_LIST).replace(r"\{per_class\}", r"(\d+)").replace(r"\{repeats\}", r"(\d+)")
    subset = re.fullmatch(pattern, cfg.data.train_list or "")
    if subset:
        write_subset_list(root, int(subset.group(1)), int(subset.group(2)))
    path = cfg.model.teacher_checkpoint
    if path and cfg.train.teacher_epochs > 0 and not Path(path).expanduser().is_file():
        print(f"model.teacher_checkpoint {path} is missing: training the teacher from scratch once "
              f"({cfg.train.teacher_epochs} epochs on all of {root / cfg.data.train_dir}, about 1.5 min on 2 cores)",
              flush=True)
        _train_teacher(cfg, Path(path).expanduser())


def run_demo(out: str = "runs/demo", overrides: tuple = ()) -> int:
    from hcd.engine.trainer import train

    start = time.perf_counter()
    if not DEMO_CONFIG.is_file():
        raise ConfigError(f"{DEMO_CONFIG}: the demo config is missing (run from a source checkout)")
    cfg = load_config(str(DEMO_CONFIG), overrides)
    run = Path(out)
    if run.exists() and any(run.iterdir()):
        if not (run / MARKER).exists():
            raise ConfigError(f"--out: {run} exists and was not written by `hcd demo`; choose another folder")
        print(f"replacing the previous demo run in {run} (a run folder written by `hcd demo`)", flush=True)
        shutil.rmtree(run)  # a previous demo: start afresh
    run.mkdir(parents=True, exist_ok=True)
    (run / MARKER).write_text("written by hcd demo\n")

    cfg.data.root = str(digits_root(cfg.data.root))
    print(f"digits folder: {cfg.data.root}", flush=True)
    if cfg.train.teacher_epochs > 0 and cfg.model.teacher_checkpoint is None:
        cfg.model.teacher_checkpoint = str(_train_teacher(cfg, run / "teacher.safetensors"))
    t_teacher = time.perf_counter() - start

    code = train(cfg, out=str(run))
    if code != 0:
        return code
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if x.strip()]
    teacher = [r for r in rows if r["kind"] == "teacher"][-1]
    evals = [r for r in rows if r["kind"] == "eval"]
    wall = time.perf_counter() - start
    print("")
    print(f"== hcd demo: {cfg.model.teacher} (teacher) -> {cfg.model.student} (student), digits, "
          f"{cfg.data.img_size} px, HCD lambda={cfg.loss.sublogit_kl_weight:g}")
    print(f"teacher val top-1: {teacher['teacher_top1']:.2f}%")
    print(f"student val top-1: {evals[-1]['val_top1']:.2f}% (last epoch), {max(e['val_top1'] for e in evals):.2f}% (best)")
    print(f"wall time: {wall:.0f} s (teacher {t_teacher:.0f} s, distillation {wall - t_teacher:.0f} s)")
    print(f"run folder: {run} (metrics.jsonl, curves.png, student/ (timm), checkpoints/)")
    print(HONEST, flush=True)
    return 0
