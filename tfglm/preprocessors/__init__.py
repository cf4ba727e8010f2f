"""Preprocessors, one per model family: strings in, a model's token ids out, in the graph (TensorFlow and
tensorflow-text ops only, so an exported SavedModel runs them without tfglm). Each is a Keras layer holding its
tokenizer; training, generation, the export and the server share it."""

from tfglm.data.chat import ChatTokenizer
from tfglm.preprocessors.causal_lm import CausalLMPreprocessor, ChatPreprocessor
from tfglm.preprocessors.encoder import EncoderPreprocessor
from tfglm.preprocessors.seq2seq import Seq2SeqPreprocessor


def language_model_preprocessor(tokenizer, sequence_length):
    """A `ChatPreprocessor` for a chat tokenizer, else a `CausalLMPreprocessor`."""
    family = ChatPreprocessor if isinstance(tokenizer, ChatTokenizer) else CausalLMPreprocessor
    return family(tokenizer, sequence_length)
