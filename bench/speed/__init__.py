"""Throughput and cost, each side by side with a peer in one run (KerasHub, PyTorch, plain Keras `fit`)."""
