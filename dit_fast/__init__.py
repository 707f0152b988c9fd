"""dit-fast: fast, faithful Diffusion Transformers."""

__version__ = "0.1.0"
