"""Pretrained checkpoints read into tfglm's config, tokenizer and weights, from two sources:

- `huggingface`: a directory in Hugging Face's layout (`tfglm.importers.huggingface`);
- `keras-hub`: a KerasHub preset directory (`tfglm.importers.keras_hub`), renamed to Hugging Face's names.

Both give a `Checkpoint` (`tfglm.importers.checkpoint`): BERT-family encoders (BERT, MiniLM) and GPT-2.
"""

from tfglm.importers import huggingface, keras_hub

READERS = {"huggingface": huggingface.read, "keras-hub": keras_hub.read}  # source -> read(directory): a Checkpoint
