"""The dynamic cross-encoder: a width- and depth-adaptive BERT with an exit head after every layer.

``dynabert.py`` is the network, ``rewire.py`` DynaBERT's head/neuron reordering, ``io.py`` model
directories (load, save, export to Hugging Face and ONNX). This package imports torch.
"""
from .dynabert import DynamicCrossEncoder, ModelConfig, RankerOutput
from .io import UninitializedWeightsWarning, export_hf, export_onnx, load_model, save_model
from .rewire import Importance, head_neuron_importance, listwise_kl, rewire

__all__ = ["DynamicCrossEncoder", "Importance", "ModelConfig", "RankerOutput", "UninitializedWeightsWarning",
           "export_hf", "export_onnx", "head_neuron_importance", "listwise_kl", "load_model", "rewire", "save_model"]
