"""Classic ID-based sequential recommenders on the same records: SASRec, GRU4Rec, Caser, popularity.

Layer 4, beside `sdpo.training` (neither imports the other): imports `sdpo.evaluation`, `sdpo.lm`, `sdpo.data` and the foundation.
"""
