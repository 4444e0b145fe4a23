"""sdpo: train language-model recommenders with Softmax-DPO (Chen et al., NeurIPS 2024)."""

__version__ = "0.2.0"
__all__ = ["Recommender", "Retriever", "__version__"]


def __getattr__(name: str):
    """`from sdpo import Recommender` without importing torch on a plain `import sdpo`."""
    if name in ("Recommender", "Retriever"):
        from sdpo import recommend

        return getattr(recommend, name)
    raise AttributeError(f"module 'sdpo' has no attribute {name!r}")
