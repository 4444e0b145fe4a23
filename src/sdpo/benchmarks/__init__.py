"""Speed and memory measured side by side in one run: the S-DPO step, fp32 against bf16, the trunk cache, baseline steps.

Layer 6: imports `sdpo.training`, `sdpo.baselines` and everything below them.
"""
