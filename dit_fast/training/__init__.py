"""Training: ``config`` (``TrainConfig`` and the recipes), ``trainer`` (the loop), ``state`` (resumable checkpoints),
``data`` (datasets and data order) and ``latents`` (VAE latent extraction for training)."""
