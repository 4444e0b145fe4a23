"""sdpo: train language-model recommenders with Softmax-DPO (Chen et al., NeurIPS 2024)."""

__version__ = "0.2.0"
