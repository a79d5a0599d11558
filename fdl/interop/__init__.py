from fdl.interop.torch_rnn import rnn_params_from_torch, rnn_params_to_torch  # noqa: F401
