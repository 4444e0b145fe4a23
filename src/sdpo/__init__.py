"""sdpo: train language-model recommenders with Softmax-DPO (Chen et al., NeurIPS 2024).

The package in layers; a module imports only from its own layer's package or from lower
layers (``tests/test_architecture.py`` checks it, and that no imports close a cycle):

0. ``errors``, ``io``, ``config``: user errors, atomic files, dataclass configs from YAML + flags
1. ``data``: records, raw sources, prepared folders, candidates, negatives, prompts
2. ``lm``: model loading with LoRA, precision, adapter folders, the packed scoring kernel, trunk cache
3. ``evaluation``: generate and rank protocols, metrics, bootstrap intervals, journals
4. ``baselines``: SASRec, GRU4Rec, Caser, popularity; a trained one as the source of collaborative tokens
5. ``training``: SFT, S-DPO/DPO, runs, export
6. ``recommend`` (the `Recommender` API) and ``benchmarks``
7. ``pipeline``: a study from one config, every stage reused or resumed
8. ``report``: tables, paired comparisons, plots
9. ``cli``: the ``sdpo`` command

``from sdpo import Recommender`` is the public entry point for applications.
"""

__version__ = "0.2.0"
__all__ = ["Recommender", "Retriever", "__version__"]


def __getattr__(name: str):
    """`from sdpo import Recommender` without importing torch on a plain `import sdpo`."""
    if name in ("Recommender", "Retriever"):
        from sdpo import recommend

        return getattr(recommend, name)
    raise AttributeError(f"module 'sdpo' has no attribute {name!r}")
