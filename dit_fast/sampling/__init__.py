"""Sampling and scoring: ``generate`` (seeded, guided, cached sampling of a DiT), ``outputs`` (PNG grids and the
ADM-evaluator ``.npz``), ``diffusers_pipeline`` (``dit_fast.accelerate``), ``metrics`` (the digits scorer),
``adm_eval`` (FID, sFID, IS, precision, recall as the ADM evaluator) and ``frechet`` (the Fréchet distance)."""
