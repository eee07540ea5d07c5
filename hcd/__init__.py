"""hcd: Heterogeneous Complementary Distillation.

The project's two packages install as `hcd.engine` (the training engine) and `hcd.kernels` (the losses), so
they never share a name with other top-level packages (Hugging Face's `kernels` is one). In the repository
they stay the top-level folders `engine/` and `kernels/`: setup.py maps them into this package for an
install, and in a checkout (`PYTHONPATH=.`, or an editable install) this package also searches the
repository's root for its subpackages.
"""
import os as _os

_HERE = _os.path.dirname(_os.path.abspath(__file__))
if not _os.path.isdir(_os.path.join(_HERE, "kernels")):  # a checkout: hcd.kernels is ./kernels
    __path__.append(_os.path.dirname(_HERE))
