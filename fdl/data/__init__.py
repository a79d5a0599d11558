"""Data: in-memory loaders, synthetic sets, image dataset readers, augmentation, text,
detection sets (banana-style generator, banana and VOC readers)."""

from fdl.data import augment, detection  # noqa: F401
from fdl.data.datasets import (  # noqa: F401  (image datasets)
    DATASETS,
    DatasetError,
    DatasetNotFoundError,
    default_data_dir,
    download,
    load_cifar10,
    load_digits,
    load_fashion_mnist,
    load_image_folder,
    load_mnist,
    read_idx,
    train_test_split,
)
from fdl.data.loader import ArrayLoader, batch_indices  # noqa: F401
from fdl.data.synthetic import high_dim_linear_data, synthetic_linear_data  # noqa: F401
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
from fdl.data.translation import (  # noqa: F401  (machine translation, fra-eng)
    NMTData,
    build_array_nmt,
    load_data_nmt,
    preprocess_nmt,
    read_data_nmt,
    tokenize_nmt,
    truncate_pad,
)
