"""Converters from pip-installable corpora to the files `tfglm train` and `tfglm finetune` read."""
