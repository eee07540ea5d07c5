"""Export the student alone: timm weights as safetensors plus a pretrained_cfg JSON next to them, so

    timm.create_model(name, pretrained=True, pretrained_cfg_overlay=dict(file="student.safetensors"),
                      num_classes=K, **model_kwargs)

loads it (the JSON holds name, num_classes, model_kwargs and the pretrained_cfg: mean, std, input size,
class names). Projectors, CFMs and the teacher are training-time only and are not exported.
"""
import json
from pathlib import Path
from typing import Optional, Sequence

import torch


def export_student(state_dict: dict, out_dir, name: str, num_classes: int, *, model_kwargs: Optional[dict] = None,
                   mean=None, std=None, img_size: int = 224, crop_pct: float = 0.875,
                   class_names: Optional[Sequence[str]] = None, stem: str = "student") -> Path:
    """Write OUT/<stem>.safetensors (fp32, contiguous) and OUT/<stem>.json; returns the weights path."""
    from safetensors.torch import save_file
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    weights = out_dir / f"{stem}.safetensors"
    tensors = {k: v.detach().to("cpu", torch.float32 if v.is_floating_point() else v.dtype).contiguous()
               for k, v in state_dict.items()}
    tmp = weights.with_suffix(".safetensors.tmp")
    save_file(tensors, str(tmp), metadata={"format": "pt", "architecture": name})
    tmp.replace(weights)
    pretrained_cfg = {
        "file": weights.name, "num_classes": num_classes, "input_size": [3, img_size, img_size],
        "crop_pct": crop_pct, "interpolation": "bilinear",  # what our val pipelines use
        "mean": list(mean) if mean is not None else None, "std": list(std) if std is not None else None,
    }
    meta = {"architecture": name, "num_classes": num_classes, "model_kwargs": dict(model_kwargs or {}),
            "label_names": list(class_names) if class_names is not None else None,
            "pretrained_cfg": pretrained_cfg}
    (out_dir / f"{stem}.json").write_text(json.dumps(meta, indent=2))
    return weights


def load_exported(weights) -> torch.nn.Module:
    """Build the timm model an export describes, through timm's own pretrained-weights path."""
    import timm
    weights = Path(weights)
    meta = json.loads(weights.with_suffix(".json").read_text())
    overlay = {k: v for k, v in meta["pretrained_cfg"].items() if v is not None}
    overlay["file"] = str(weights)
    return timm.create_model(meta["architecture"], pretrained=True, pretrained_cfg_overlay=overlay,
                             num_classes=meta["num_classes"], **meta["model_kwargs"])
