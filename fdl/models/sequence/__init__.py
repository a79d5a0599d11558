"""Sequence models: character language models (rnn_lm), encoder-decoder, decoding, BLEU."""

from fdl.models.sequence import decoding, nadaraya_watson, seq2seq  # noqa: E402, F401
from fdl.models.sequence.bleu import bleu  # noqa: E402, F401
from fdl.models.sequence.decoding import (  # noqa: E402, F401
    DecodeResult,
    beam_search,
    greedy_search,
)
from fdl.models.sequence.rnn_lm import predict, rnn_lm  # noqa: E402, F401
from fdl.models.sequence.seq2seq import (  # noqa: E402, F401
    Seq2SeqConfig,
    init_seq2seq,
    predict_seq2seq,
    train_seq2seq,
    translate,
)
