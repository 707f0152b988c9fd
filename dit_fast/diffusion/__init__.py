"""Gaussian diffusion with learned sigma (the DiT paper's diffusion)."""
