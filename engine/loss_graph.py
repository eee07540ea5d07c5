"""train.cuda_graph_loss: the HCD distiller's one hcd_loss call, forward and backward each replayed from a CUDA
graph (torch.cuda.make_graphed_callables), so a step issues one graph launch for the loss each way instead of
the Python, validation and six kernel launches of the fused path.

Why make_graphed_callables and not torch.compile(mode="reduce-overhead") over torch.library.triton_op: the
fused path is a torch.autograd.Function launching Triton kernels from Python helpers (kernels/hcd_step.py);
make_graphed_callables captures it as it is (nothing in it syncs with the host, allocates pinned memory or
depends on tensor values on the host), while the compile route needs every launch rewritten as custom ops
with wrap_triton and a registered autograd formula (torch >= 2.6; the project supports >= 2.4).

What capture needs, and how it is met here:
- static shapes and dtypes: one capture per input signature (shapes, dtypes, requires_grad, config), at most
  MAX_CAPTURES (a partial last batch is a second one); beyond that the call runs uncaptured.
- fixed addresses: the weights are the captured graph's inputs themselves (no copy per step); their
  addresses are checked per call and a changed one (a parameter re-allocated) recaptures. Activations are
  copied into the graph's static inputs (a few MB per step).
- gradients: the graphed backward returns its static gradient buffers; AccumulateGrad would keep such a
  buffer as the parameter's .grad, and the next replay would overwrite it (gradient accumulation silently
  wrong: pytorch/pytorch#181723; TransformerEngine clones them, NVIDIA/TransformerEngine#2937). The trainable
  leaves (the CFM weight and bias) therefore pass through _OwnGrad, whose backward hands autograd a copy.
- outputs live in static buffers overwritten by the next replay: the loss and parts are handed out as copies
  (two small launches), so a caller may keep them (a running sum of losses would otherwise change under it).
  The autograd graph of one call must be backpropagated before the next call's forward replays (the trainer
  alternates forward and backward per micro-batch).
Refused where it cannot work: on CPU (no CUDA graphs), with ZeRO-3 (its hooks re-gather the CFM weights into
new storage around every forward) and for methods whose distiller has no hcd_loss call (engine/config.py).
"""
from typing import Callable, Optional

import torch

from hcd.engine.config_tree import ConfigError
from hcd.kernels import hcd_loss, loss_part_names

MAX_CAPTURES = 2


class _OwnGrad(torch.autograd.Function):
    """Identity on the forward; the backward hands autograd a copy of the incoming gradient (see above)."""

    @staticmethod
    def forward(ctx, t):
        return t.view_as(t)

    @staticmethod
    def backward(ctx, grad):
        return grad.clone()


class GraphedLoss:
    """A drop-in for hcd.kernels.hcd_loss (same arguments and results) that captures the call per input
    signature and replays it. capture: make_graphed_callables's signature (tests pass a CPU stand-in)."""

    def __init__(self, capture: Optional[Callable] = None, max_captures: int = MAX_CAPTURES):
        self.capture = capture or torch.cuda.make_graphed_callables
        self.max_captures = max_captures
        self.graphs = {}     # signature -> (graphed callable, the weights' addresses at capture)
        self.captures = 0    # captures made (a recapture counts)

    def __call__(self, x_students, x_teacher, weights, biases, teacher_logits, student_logits, target, cfg,
                 backend: str = "auto", stages=None):
        if not isinstance(x_students, torch.Tensor):
            x_students = torch.stack(tuple(x_students))
        args = [x_students, x_teacher, weights, teacher_logits, student_logits, target]
        args += [biases] if biases is not None else []
        if not torch.is_grad_enabled():  # nothing to replay a backward for: the plain call
            return hcd_loss(x_students, x_teacher, weights, biases, teacher_logits, student_logits, target, cfg,
                            backend=backend, stages=stages)
        stages = tuple(stages) if stages is not None else None
        key = (tuple((tuple(t.shape), t.dtype, t.device, t.requires_grad) for t in args), cfg, backend, stages)
        fn = self._graphed(key, args)
        if fn is None:
            return hcd_loss(x_students, x_teacher, weights, biases, teacher_logits, student_logits, target, cfg,
                            backend=backend, stages=stages)
        total, values = fn(*(_OwnGrad.apply(t) if _trainable_leaf(t) else t for t in args))
        names = loss_part_names(stages if stages is not None else x_students.shape[0])
        # copies of the static outputs (two small launches), so a caller may keep them past the next replay
        return total.clone(), dict(zip(names, values.detach().clone().unbind(0)))

    def _graphed(self, key, args):
        """The captured callable for this signature (captured now if new, or if a weight moved); None when
        the capture budget is spent."""
        ptrs = tuple(t.data_ptr() for t in args if _trainable_leaf(t))
        found = self.graphs.get(key)
        if found is not None and found[1] == ptrs:
            return found[0]
        if self.captures >= self.max_captures:
            return None
        cfg, backend, stages = key[1:]
        has_bias = len(args) == 7

        def loss(x_s, x_t, w, z_t, z_s, y, b=None):
            total, parts = hcd_loss(x_s, x_t, w, b if has_bias else None, z_t, z_s, y, cfg, backend=backend,
                                    stages=stages)
            return total, torch.stack(list(parts.values()))  # one non-differentiable output, not 5 + 3*S

        # the weights are captured in place (no copy per step); the activations through static copies
        sample = tuple(t if _trainable_leaf(t) else t.detach().clone().requires_grad_(t.requires_grad) for t in args)
        self.graphs[key] = (self.capture(loss, sample), ptrs)
        self.captures += 1
        return self.graphs[key][0]


def _trainable_leaf(t: torch.Tensor) -> bool:
    return t.is_leaf and t.requires_grad


def graphed_loss(distiller, device: torch.device) -> GraphedLoss:
    """The loss_fn for train.cuda_graph_loss, or a one-line ConfigError where it cannot run."""
    if device.type != "cuda":
        raise ConfigError(f"train.cuda_graph_loss: CUDA graphs need a CUDA device, and this run's device is "
                          f"{device.type}; set train.cuda_graph_loss=false")
    if not hasattr(distiller, "loss_fn"):
        raise ConfigError(f"train.cuda_graph_loss: {type(distiller).__name__} makes no hcd_loss call to capture "
                          "(the HCD method's distiller does); set train.cuda_graph_loss=false")
    return GraphedLoss()
