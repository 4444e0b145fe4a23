"""Classic ID-based sequential recommenders on the same records: SASRec, GRU4Rec, Caser, popularity.

Layer 4, below `sdpo.training` (which reads a trained model as the source of collaborative tokens): imports `sdpo.evaluation`,
`sdpo.lm`, `sdpo.data` and the foundation.
"""
