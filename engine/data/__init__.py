"""Data loading: DALI pipelines, torch fallback, the embedded demo dataset, data-check."""
