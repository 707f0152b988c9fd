"""The network: ``DiTConfig`` and the zoo (``config``), ``DiTFast`` (``dit``), attention backends (``attention``),
CUDA-graph serving (``cuda_graph``) and the Stable Diffusion VAE (``vae``).
The plain reference model, the oracle every fast path is tested against, is ``dit_fast.reference``."""
