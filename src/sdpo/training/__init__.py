"""Training runs: SFT, S-DPO/DPO with its reference table and losses, run folders, logs, exported adapters.

Layer 5: imports `sdpo.baselines` (collaborative models), `sdpo.evaluation` (candidate log-probs), `sdpo.lm`, `sdpo.data` and the foundation.
"""
