from fdl.interop.state_dict import (  # noqa: F401
    StateDictError,
    StateDictFileError,
    load_state_dict,
    save_safetensors,
    to_numpy_state_dict,
)
from fdl.interop.torch_rnn import rnn_params_from_torch, rnn_params_to_torch  # noqa: F401
from fdl.interop.torchvision import (  # noqa: F401
    from_torchvision,
    to_torchvision,
    torchvision_model,
)
