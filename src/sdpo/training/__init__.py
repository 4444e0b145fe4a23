"""Training stages built on transformers.Trainer: SFT (and the preference stage)."""
