"""The language model: loading it with LoRA, precision, adapter folders, the packed scoring kernel, the trunk cache.

Layer 2: imports `sdpo.data` and the foundation.
"""
