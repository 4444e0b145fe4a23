"""Measuring a model: the generate and rank protocols, ranking metrics, bootstrap intervals, resumable journals.

Layer 3: imports `sdpo.lm`, `sdpo.data` and the foundation.
"""
