"""What a checkpoint must be resumed or evaluated with (its layout.json), and the checks of a run folder that
run before anything is built, loaded or written: a mismatch is a one-line ConfigError that leaves the run
folder as it was."""
from pathlib import Path
from typing import Optional

import torch

from hcd.engine import checkpoint
from hcd.engine.config import Config, ConfigError
from hcd.engine.errors import output_path_problem

RESUME_RULE = ("a run resumes only with the same method, world size, data.batch_size, train.grad_accum, "
               "deepspeed.zero_stage, train.precision and optim.name")


def run_layout(cfg: Config, world: int, model: Optional[torch.nn.Module] = None) -> dict:
    """What a resume must match: the method (it decides the modules), the data order and position (world
    size, per-rank batch, accumulation give the shards and the step count per epoch), DeepSpeed's per-rank
    optimizer state (ZeRO stage, precision, optimizer) and, with `model`, the shape of every parameter
    (model.*, head.* and loss.n_sublogits decide them)."""
    layout = {"method": cfg.method, "world size (processes)": world, "data.batch_size": cfg.data.batch_size,
              "train.grad_accum": cfg.train.grad_accum, "deepspeed.zero_stage": cfg.deepspeed.zero_stage,
              "train.precision": cfg.train.precision, "optim.name": cfg.optim.name}
    if model is not None:
        layout["parameters"] = parameter_shapes(model)
    return layout


def parameter_shapes(model: torch.nn.Module) -> dict:
    return {name: list(p.shape) for name, p in model.named_parameters()}


def check_layout(saved: Optional[dict], now: dict, folder: Path, flag: str = "--resume", why: str = RESUME_RULE,
                 hint: str = "") -> None:
    """One-line ConfigError naming the first field of `now` that differs from the checkpoint's, or the
    first parameters whose shapes differ (none: a checkpoint written before layouts were kept, or before
    they held the parameters, is loaded as before)."""
    if saved is None:
        return
    for key, value in now.items():
        if key != "parameters" and key in saved and saved[key] != value:
            raise ConfigError(f"{flag}: {key} is {value} but {folder} was written with {saved[key]}; {why}")
    if "parameters" in now and "parameters" in saved:
        older = older_layout(saved["parameters"], now["parameters"])
        if older:
            raise ConfigError(f"{flag}: {folder} was written by an older hcd, {older}; resume or evaluate it with "
                              f"the hcd version that wrote it{hint}")
        diff = parameter_differences(saved["parameters"], now["parameters"])
        if diff:
            more = f" (+{len(diff) - 2} more)" if len(diff) > 2 else ""
            raise ConfigError(f"{flag}: this config builds another model than {folder} holds: {'; '.join(diff[:2])}"
                              f"{more}; model.*, head.* and loss.n_sublogits must be the run's{hint}")


# Parameters this version names differently from older ones: a checkpoint without them was written by an older
# hcd, not with another config (its names may already be filtered to this model's: see with_legacy_shapes).
RENAMED_PARAMETERS = {"cfm_weight": "which kept one CFM output Linear per stage (cfms.K.out.weight/.bias) where "
                                    "this version stacks them into cfm_weight/cfm_bias"}


def older_layout(saved: dict, now: dict) -> str:
    """What an older hcd named differently, when this model has a renamed parameter the checkpoint lacks."""
    for new, what in RENAMED_PARAMETERS.items():
        here = any(k == new or k.endswith("." + new) for k in now)
        if here and not any(k == new or k.endswith("." + new) for k in saved):
            return what
    return ""


def with_legacy_shapes(saved: Optional[dict], ckpt_dir: Path, tag: str, params: dict) -> Optional[dict]:
    """A checkpoint's layout (read_layout), with parameter shapes even when it was written before they were
    kept: then recovered from DeepSpeed's model-states file, buffers included, so this model's names only."""
    if saved is None or "parameters" in saved:
        return saved
    legacy = checkpoint.legacy_parameter_shapes(ckpt_dir, tag)
    return dict(saved, parameters={k: v for k, v in legacy.items() if k in params}) if legacy else saved


def parameter_differences(saved: dict, now: dict) -> list:
    """Readable differences between two {parameter name: shape} maps, in the model's order."""
    diff = [f"{k} is {tuple(v)} here, {tuple(saved[k])} in the checkpoint" for k, v in now.items()
            if k in saved and list(saved[k]) != list(v)]
    diff += [f"{k} is not in the checkpoint" for k in now if k not in saved]
    diff += [f"the checkpoint's {k} is not in this model" for k in saved if k not in now]
    return diff


def check_run_folder(run: Path, resume: bool) -> Optional[str]:
    """The step folder a run continues from (None for a fresh run), after refusing every folder that the
    run would damage: a path that cannot be a folder, a fresh run into a folder that holds a run, a resume
    with nothing to resume."""
    problem = output_path_problem(run, directory=True)
    if problem:
        raise ConfigError(f"--out: {problem}")
    ckpt_dir = run / "checkpoints"
    tag = checkpoint.read_pointer(ckpt_dir, "latest")
    steps = checkpoint.step_tags(ckpt_dir)
    metrics = run / "metrics.jsonl"
    if resume and tag is None:
        if steps:  # the pointer was lost (a crash between a save's rename and its pointer update)
            raise ConfigError(f"--resume: {ckpt_dir}/latest names no checkpoint, but {', '.join(steps)} exist: "
                              f"write one of them into {ckpt_dir / 'latest'} (e.g. {steps[-1]}) and resume again")
        stopped = (f" (the run stopped before its first save: start afresh with another --out, or remove {metrics})"
                   if metrics.exists() else " (nothing to resume)")
        raise ConfigError(f"--resume: no checkpoint in {ckpt_dir}{stopped}")
    if not resume and (tag is not None or steps):
        raise ConfigError(f"--out: {run} already holds a run with checkpoints; pass --resume to continue it or "
                          "choose another --out (a fresh run would replace them)")
    if not resume and metrics.exists():
        raise ConfigError(f"--out: {run} already holds the metrics of a run that saved no checkpoint; choose "
                          f"another --out or remove {metrics}")
    return tag
