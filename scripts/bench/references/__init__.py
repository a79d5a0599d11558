"""Reference implementations (Flax linen, Equinox, PyTorch) used only by the benchmarks."""
