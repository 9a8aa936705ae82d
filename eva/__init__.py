"""eva: the model layer of eva-kernels — a drop-in for PEFT's EVA initialization.

    from eva import get_eva_state_dict, initialize_lora_eva_weights

EVA (Explained Variance Adaptation) initializes LoRA's A matrices with the top right-singular
vectors of each layer's input activations and redistributes ranks across layers by explained
variance. This engine computes them exactly (PCA of every token consumed) from running
covariances updated by the fused kernels of :mod:`eva_kernels`.
"""
from eva_kernels import __version__

from .api import get_eva_state_dict, initialize_lora_eva_weights
from .config import EvaOptions
from .engine import EvaObserver
from .errors import EvaError, EvaNotConvergedError
from .peft.inputs import (forward_fn_dict, layer_input_rules, prepare_layer_inputs_fn_language_modeling,
                          prepare_model_inputs_fn_language_modeling)
from .result import EvaStateDict, load_eva_state_dict

__all__ = [
    "get_eva_state_dict", "initialize_lora_eva_weights", "EvaStateDict", "load_eva_state_dict",
    "EvaOptions", "EvaObserver", "EvaError", "EvaNotConvergedError", "forward_fn_dict",
    "prepare_model_inputs_fn_language_modeling", "prepare_layer_inputs_fn_language_modeling", "layer_input_rules",
    "__version__",
]
