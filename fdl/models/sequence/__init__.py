"""Sequence models as Layers: character language models (:mod:`.rnn_lm`), the encoder-decoder
combinator (:mod:`.encoder_decoder`) and the book's seq2seq models (:mod:`.seq2seq`),
Nadaraya-Watson regression, decoding (greedy and beam search over any decoder Layer), BLEU."""

from fdl.models.sequence import (  # noqa: F401
    decoding,
    encoder_decoder,
    nadaraya_watson,
    rnn_lm,
    seq2seq,
)
from fdl.models.sequence.bleu import bleu  # noqa: F401
from fdl.models.sequence.decoding import (  # noqa: F401
    DecodeResult,
    beam_search,
    greedy_search,
)
from fdl.models.sequence.encoder_decoder import Decoder, EncoderDecoder  # noqa: F401
