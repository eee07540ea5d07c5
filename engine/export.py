"""Export the student alone, in two forms:

- OUT/student/ in timm's own Hugging Face layout (timm.models.save_for_hf: config.json + model.safetensors), so

      timm.create_model("local-dir:OUT/student", pretrained=True)

  builds it with its classifier, model kwargs, pretrained_cfg (mean, std, input size, crop) and class names;
- OUT/student.safetensors + OUT/student.json (name, num_classes, model_kwargs, pretrained_cfg, class names), the
  earlier layout, kept readable for a release:
      timm.create_model(name, pretrained=True, pretrained_cfg_overlay=dict(file="student.safetensors",
                        num_classes=K), num_classes=K, **model_kwargs)

Projectors, CFMs and the teacher are training-time only and are not exported. With train.ema_decay the EMA of
the student (engine/ema.py) is exported beside it in the same two forms, as OUT/student_ema/ and
OUT/student_ema.safetensors + .json.
"""
import json
import os
import shutil
from pathlib import Path
from typing import Optional, Sequence

import torch


def export_student(state_dict: dict, out_dir, name: str, num_classes: int, *, model_kwargs: Optional[dict] = None,
                   mean=None, std=None, img_size: int = 224, crop_pct: float = 0.875,
                   class_names: Optional[Sequence[str]] = None, stem: str = "student") -> Path:
    """Write OUT/<stem>/ (timm's layout), OUT/<stem>.safetensors (fp32, contiguous) and OUT/<stem>.json;
    returns the .safetensors path."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    weights = out_dir / f"{stem}.safetensors"
    tensors = {k: v.detach().to("cpu", torch.float32 if v.is_floating_point() else v.dtype).contiguous()
               for k, v in state_dict.items()}
    save_safetensors(tensors, weights, metadata={"format": "pt", "architecture": name})
    pretrained_cfg = {
        "file": weights.name, "num_classes": num_classes, "input_size": [3, img_size, img_size],
        "crop_pct": crop_pct, "crop_mode": "center", "interpolation": "bilinear",  # what our val pipelines use
        "mean": list(mean) if mean is not None else None, "std": list(std) if std is not None else None,
    }
    meta = {"architecture": name, "num_classes": num_classes, "model_kwargs": dict(model_kwargs or {}),
            "label_names": list(class_names) if class_names is not None else None,
            "pretrained_cfg": pretrained_cfg}
    (out_dir / f"{stem}.json").write_text(json.dumps(meta, indent=2))
    save_timm_folder(tensors, out_dir / stem, meta)
    return weights


def save_timm_folder(tensors: dict, folder: Path, meta: dict) -> None:
    """OUT/<stem>/ through timm.models.save_for_hf, written into a sibling temporary folder and renamed into
    place (a crash leaves the previous export or none, never half of one); files readable as save_safetensors'."""
    import timm
    from timm.models import save_for_hf
    model = timm.create_model(meta["architecture"], num_classes=meta["num_classes"], **meta["model_kwargs"])
    model.load_state_dict(tensors)
    model.pretrained_cfg = {**model.pretrained_cfg, **{k: v for k, v in meta["pretrained_cfg"].items()
                                                      if v is not None and k != "file"}}
    tmp, old = folder.with_name(folder.name + ".tmp"), folder.with_name(folder.name + ".old")
    for stale in (tmp, old):
        shutil.rmtree(stale, ignore_errors=True)
    config = {"label_names": meta["label_names"]} if meta["label_names"] is not None else None
    save_for_hf(model, str(tmp), model_config=config, model_args=meta["model_kwargs"] or None, safe_serialization=True)
    umask = os.umask(0)
    os.umask(umask)
    for f in tmp.iterdir():
        os.chmod(f, 0o666 & ~umask)
    if folder.exists():
        folder.rename(old)
    tmp.rename(folder)
    shutil.rmtree(old, ignore_errors=True)


def save_safetensors(tensors: dict, path: Path, metadata: Optional[dict] = None) -> None:
    """Atomically (a sibling .tmp, then os.replace), readable as any file this process writes: safetensors
    creates its files 0600, which other users of a shared cluster could not read."""
    from safetensors.torch import save_file
    tmp = Path(path).with_name(Path(path).name + ".tmp")
    save_file(tensors, str(tmp), metadata=metadata)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)
    os.replace(tmp, path)


def load_exported(weights) -> torch.nn.Module:
    """Build the timm model an export describes (a timm folder or a .safetensors + .json), through timm's own
    pretrained-weights path."""
    import timm
    weights = Path(weights)
    if weights.is_dir():
        return timm.create_model(f"local-dir:{weights}", pretrained=True)
    meta = json.loads(weights.with_suffix(".json").read_text())
    overlay = {k: v for k, v in meta["pretrained_cfg"].items() if v is not None}
    overlay["file"] = str(weights)
    return timm.create_model(meta["architecture"], pretrained=True, pretrained_cfg_overlay=overlay,
                             num_classes=meta["num_classes"], **meta["model_kwargs"])


def student_state_dict(engine, zero_stage: int, rank: int) -> dict:
    """The timm student's full state dict on rank 0 ({} on the others); collective (every rank calls it).

    Parameters are the fp32 master weights wherever DeepSpeed keeps them (16-bit training under ZeRO or
    its bf16 optimizer), not the 16-bit copies the model computes with: a bf16 copy keeps 8 bits of
    mantissa. Buffers (BatchNorm statistics) are the module's own. ZeRO-3 gathers its partitions."""
    from deepspeed.utils import safe_get_full_fp32_param
    student = engine.module.student.model
    fp16 = _fp16_masters(engine.optimizer)
    masters = {name: fp16.get(id(p)) if id(p) in fp16 else safe_get_full_fp32_param(p)  # collective
               for name, p in student.named_parameters()}
    if zero_stage == 3:
        import deepspeed
        with deepspeed.zero.GatheredParameters(list(student.parameters()), modifier_rank=None):
            sd = {k: v.detach().clone() for k, v in student.state_dict().items()} if rank == 0 else {}
    else:
        sd = dict(student.state_dict()) if rank == 0 else {}
    if rank != 0:
        return {}
    for name, master in masters.items():
        if master is not None and name in sd:
            sd[name] = master.detach().float()
    return sd


def _fp16_masters(optimizer) -> dict:
    """id(parameter) -> fp32 master under DeepSpeed's ZeRO-0 16-bit optimizers (FP16_Optimizer, or
    FP16_UnfusedOptimizer, which 0.19 also uses for bf16-pure at ZeRO-0): safe_get_full_fp32_param returns
    None there, and the export would hold the 16-bit copies. {} for every other optimizer."""
    from torch._utils import _unflatten_dense_tensors
    groups = getattr(optimizer, "fp16_groups", None)
    if groups is None:
        return {}
    if hasattr(optimizer, "fp32_groups_flat"):
        masters = [_unflatten_dense_tensors(flat, g) for flat, g in zip(optimizer.fp32_groups_flat, groups)]
    else:
        masters = getattr(optimizer, "fp32_groups", [])
    return {id(p): m for g, ms in zip(groups, masters) for p, m in zip(g, ms)}


def export_from_engine(cfg, engine, out_dir: Path, rank: int, class_names, stem: str = "student", ema=None) -> None:
    """Export the student a DeepSpeed engine trains (collective; rank 0 writes and says where), and with `ema`
    (engine/ema.py's StudentEma, the same on every rank) its EMA as <stem>_ema."""
    from hcd.engine.models import norm_stats
    sd = student_state_dict(engine, cfg.deepspeed.zero_stage, rank)
    if rank == 0:
        stats = norm_stats(engine.module.student.model)
        export_state_dict(cfg, sd, stats, out_dir, class_names, stem)
        if ema is not None:
            export_state_dict(cfg, ema.module.state_dict(), stats, out_dir, class_names, f"{stem}_ema",
                              "the student's EMA")


def export_state_dict(cfg, sd: dict, stats: tuple, out_dir: Path, class_names, stem: str,
                      what: str = "the student") -> Path:
    """export_student of a state dict of the config's student, with the run's data settings; says where."""
    path = export_student(sd, out_dir, cfg.model.student, cfg.model.num_classes, model_kwargs=cfg.model.student_kwargs,
                          mean=stats[0], std=stats[1], img_size=cfg.data.img_size, crop_pct=cfg.data.crop_pct,
                          class_names=class_names, stem=stem)
    print(f"exported {what}: {path.with_suffix('')}/ (timm: create_model(\"local-dir:{path.with_suffix('')}\", "
          f"pretrained=True)), and {path} + {path.with_suffix('.json').name}", flush=True)
    return path
