"""Quality runs, each beside its simple baseline (nanoGPT's loss, TF-IDF, a model from scratch, a control)."""
