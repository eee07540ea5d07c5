"""hcd training engine: models, distiller, data, trainer and CLI (no Triton here: see kernels/)."""
