"""The distillation methods besides HCD (docs/method.md, Baselines), each a module with HCDDistiller's contract:
`student`, `projectors`, `uses_teacher`, `set_epoch(epoch)` and forward(images, target, f_t, z_t) -> DistillOutput.
The trainer, logging, checkpoints, export and evaluation do not know which method runs.

- logits.py: ce, kd, dkd, dist (the student alone, losses on its logits)
- ofa.py: OFA-KD (a projector and a Linear to C logits per used stage)
"""
