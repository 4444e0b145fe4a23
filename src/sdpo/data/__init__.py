"""Records and where they come from: raw sources, prepared folders, candidates, negatives, prompts.

Layer 1 of the package: imports only the foundation (`sdpo.errors`, `sdpo.io`, `sdpo.config`), no torch models.
"""
