"""tfglm's Keras models. Importing the package registers every model and layer (package "tfglm"), so
`keras.saving.load_model` reads any tfglm `.keras` file without `custom_objects`."""

from tfglm.models import encoder, encoder_decoder, gpt, heads

__all__ = ["encoder", "encoder_decoder", "gpt", "heads"]
