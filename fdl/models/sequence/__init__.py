"""Sequence models: character language models (rnn_lm), encoder-decoder, decoding, BLEU."""
