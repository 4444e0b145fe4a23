"""Classic ID-based sequential recommenders on the same records: SASRec, GRU4Rec, Caser, popularity."""
