from fdl.data.text import (  # noqa: F401  (text pipeline)
    SeqDataLoader,
    Vocab,
    load_corpus_time_machine,
    load_data_time_machine,
    read_time_machine,
    seq_data_iter_random,
    seq_data_iter_sequential,
    tokenize,
)
