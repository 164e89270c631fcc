"""Model directories: load, save, export. No pickle anywhere: weights are safetensors, the rest JSON.

A rankshrink model directory is a plain Hugging Face cross-encoder plus two files::

    config.json              BertForSequenceClassification config (one label)
    model.safetensors        backbone + pooler + classifier, Hugging Face names
    tokenizer.json ...       the tokenizer, as save_pretrained writes it
    rankshrink.json          widths, depths, exit layers and their pooling, rewiring order, and free-form ``metadata``
                             (other modules keep ``calibration`` and ``profile`` there)
    rankshrink.safetensors   the exit heads: exits.{layer}.pooler.weight, ...

so ``AutoModelForSequenceClassification.from_pretrained(dir)`` loads its full network as is.

>>> model = load_model("../shared/models/all-MiniLM-L6-v2")    # doctest: +SKIP  (a plain HF BertModel)
>>> save_model(model, "models/minilm-dyna")                     # doctest: +SKIP
>>> export_hf(model, "models/minilm-w50-d50", width=0.5, depth=0.5)   # doctest: +SKIP
>>> export_onnx(model, "models/minilm-w50-d50.onnx", width=0.5, depth=0.5)   # doctest: +SKIP
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
import warnings
from collections.abc import Mapping
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any, Iterator

import torch

from ..errors import InputError, error_summary
from .dynabert import DynamicCrossEncoder, ModelConfig, check_depth_layers, check_exit_pooling

HF_CONFIG = "config.json"
BACKBONE_WEIGHTS = "model.safetensors"
BACKBONE_INDEX = "model.safetensors.index.json"
MANIFEST = "rankshrink.json"
EXIT_WEIGHTS = "rankshrink.safetensors"
TOKENIZER_FILES = ("tokenizer.json", "vocab.txt")   # either one makes a loadable BERT tokenizer
FORMAT, FORMAT_VERSION = "rankshrink-model", 1
HEAD_NAMES = ("bert.pooler.dense.weight", "bert.pooler.dense.bias", "classifier.weight", "classifier.bias")


class UninitializedWeightsWarning(UserWarning):
    """Parts of the network were not in the checkpoint and start from an initialisation: train before use."""


# ---------------------------------------------------------------------------------------------
# Loading


def load_model(source: str | os.PathLike, *, revision: str | None = None, dtype: torch.dtype = torch.float32,
               device: str | torch.device = "cpu") -> DynamicCrossEncoder:
    """Load a rankshrink model directory, a plain Hugging Face BERT checkpoint directory (``BertModel`` or
    ``BertForSequenceClassification`` with one label, safetensors), or a hub id such as
    ``cross-encoder/ms-marco-MiniLM-L-6-v2`` (downloaded when online) at ``revision`` (a branch, tag or
    commit; default: main).

    Parts a plain checkpoint lacks (pooler, classifier, exit heads) are initialised and a
    ``UninitializedWeightsWarning`` says which.

    >>> model = load_model("../shared/models/all-MiniLM-L6-v2")      # doctest: +SKIP
    >>> model.score("cat", ["A cat is a feline."], width=0.5).shape  # doctest: +SKIP
    torch.Size([1])
    """
    path = Path(source)
    if not path.exists():
        path = _download(str(source), revision)
    elif revision is not None:
        raise InputError(f"{source}: a revision ({revision!r}) names a commit of a hub id, not of a local directory")
    if not path.is_dir():
        raise InputError(f"{source}: expected a model directory, found a file")
    model = _load_rankshrink_dir(path) if (path / MANIFEST).is_file() else _load_hf_dir(path)
    return model.to(device=device, dtype=dtype).eval()


def _download(source: str, revision: str | None) -> Path:
    if source.startswith((".", "/", "~")) or source.count("/") > 1 or not source.strip():
        raise InputError(f"{source}: no such model directory")
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(source, revision=revision, allow_patterns=["*.json", "*.safetensors", "*.txt"]))
    except Exception as error:  # offline, unknown id, gated repo: one message for all
        raise InputError(f"{source}: not a local directory, and fetching it from the Hugging Face hub failed "
                         f"({error_summary(error)})") from error


def _read_json(path: Path) -> dict[str, Any]:
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise InputError(f"{path}:{error.lineno}: not valid JSON ({error.msg})") from None
    if not isinstance(value, dict):
        raise InputError(f"{path}: expected a JSON object, found {type(value).__name__}")
    return value


def _read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    try:
        return load_file(str(path))
    except Exception as error:
        raise InputError(f"{path}: not a readable safetensors file ({error})") from None


def _read_backbone(directory: Path) -> tuple[dict[str, torch.Tensor], str]:
    single, index = directory / BACKBONE_WEIGHTS, directory / BACKBONE_INDEX
    if single.is_file():
        return _read_safetensors(single), str(single)
    if index.is_file():  # sharded checkpoint
        tensors: dict[str, torch.Tensor] = {}
        for shard in sorted(set(_read_json(index).get("weight_map", {}).values())):
            if not (directory / shard).is_file():
                raise InputError(f"{index}: names shard {shard}, which is missing from {directory}")
            tensors.update(_read_safetensors(directory / shard))
        return tensors, str(index)
    pickled = [name for name in ("pytorch_model.bin", "tf_model.h5") if (directory / name).exists()]
    if pickled:
        raise InputError(f"{directory}: has {pickled[0]} but no {BACKBONE_WEIGHTS}; rankshrink reads safetensors only "
                         f"(a .bin file is a pickle, which can run code when loaded). Convert it once with "
                         f"transformers' save_pretrained(safe_serialization=True).")
    raise InputError(f"{directory}: missing {BACKBONE_WEIGHTS}")


def _config_from(hf_config: Mapping[str, Any], where: Path, **overrides) -> ModelConfig:
    try:
        return ModelConfig.from_hf(hf_config, **overrides)
    except (InputError, TypeError, ValueError) as error:
        raise InputError(f"{where}: {error}") from None


def _load_tokenizer(directory: Path, required: bool):
    if not any((directory / name).is_file() for name in TOKENIZER_FILES):
        if required:
            raise InputError(f"{directory}: missing tokenizer files (expected {' or '.join(TOKENIZER_FILES)})")
        warnings.warn(f"{directory}: no tokenizer files; model.score needs model.tokenizer set", stacklevel=3)
        return None
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(directory))


def _load_hf_dir(directory: Path) -> DynamicCrossEncoder:
    if not (directory / HF_CONFIG).is_file():
        raise InputError(f"{directory}: missing {HF_CONFIG} (expected a Hugging Face BERT checkpoint or a "
                         f"rankshrink model directory)")
    tensors, source = _read_backbone(directory)
    hf_config = _read_json(directory / HF_CONFIG)
    config = _config_from(hf_config, directory / HF_CONFIG)
    model = DynamicCrossEncoder(config, tokenizer=_load_tokenizer(directory, required=False))
    initialised = model.load_hf_weights(tensors, source, optional=HEAD_NAMES)
    model.reset_exits_from_final_head()
    model.hf_config = hf_config
    news = []
    if initialised:
        news.append(f"{', '.join(initialised)} not in the checkpoint: initialised randomly (BERT's N(0, 0.02))")
    if config.exit_layers:
        news.append(f"exit heads after layers {list(config.exit_layers)} are new: copies of the final head")
    if news:
        warnings.warn(f"{directory}: " + "; ".join(news) + ". Train them (rankshrink train) before relying on "
                      f"{'the scores' if initialised else 'early exits'}.", UninitializedWeightsWarning, stacklevel=3)
    return model


def _load_rankshrink_dir(directory: Path) -> DynamicCrossEncoder:
    for name in (HF_CONFIG, BACKBONE_WEIGHTS):
        if not (directory / name).is_file():
            raise InputError(f"{directory}: missing {name} (a rankshrink model directory holds {HF_CONFIG}, "
                             f"{BACKBONE_WEIGHTS}, {MANIFEST}, {EXIT_WEIGHTS} and tokenizer files)")
    manifest = _read_json(directory / MANIFEST)
    where = directory / MANIFEST
    if manifest.get("format") != FORMAT:
        raise InputError(f"{where}: 'format' is {manifest.get('format')!r}, expected {FORMAT!r}")
    if manifest.get("format_version") != FORMAT_VERSION:
        raise InputError(f"{where}: format_version {manifest.get('format_version')!r} is not supported "
                         f"(this rankshrink reads version {FORMAT_VERSION})")
    for key in ("exit_layers", "widths", "depths"):
        if not isinstance(manifest.get(key), list):
            raise InputError(f"{where}: {key!r} must be a list, found {manifest.get(key)!r}")
    # Absent from models written before "pair" pooling and "prefix" depths existed: [CLS] exits, spread layers.
    try:
        exit_pooling = check_exit_pooling(manifest.get("exit_pooling", "cls"))
        depth_layers = check_depth_layers(manifest.get("depth_layers", "spread"))
    except InputError as error:
        raise InputError(f"{where}: {error}") from None
    hf_config = _read_json(directory / HF_CONFIG)
    config = _config_from(hf_config, directory / HF_CONFIG, exit_layers=tuple(manifest["exit_layers"]),
                          widths=tuple(manifest["widths"]), depths=tuple(manifest["depths"]), exit_pooling=exit_pooling,
                          depth_layers=depth_layers)
    model = DynamicCrossEncoder.blank(config, tokenizer=_load_tokenizer(directory, required=True))
    tensors, source = _read_backbone(directory)
    model.load_hf_weights(tensors, source)
    if config.exit_layers:
        if not (directory / EXIT_WEIGHTS).is_file():
            raise InputError(f"{directory}: missing {EXIT_WEIGHTS} (the exit heads after layers "
                             f"{list(config.exit_layers)} that {MANIFEST} lists)")
        _load_exact(model.exits, _read_safetensors(directory / EXIT_WEIGHTS), directory / EXIT_WEIGHTS, "exits.")
    model.hf_config = hf_config
    model.rewiring = _checked_rewiring(manifest.get("rewiring"), config, where)
    model.metadata = manifest.get("metadata") or {}
    if not isinstance(model.metadata, dict):
        raise InputError(f"{where}: 'metadata' must be an object, found {type(model.metadata).__name__}")
    return model


def _checked_rewiring(rewiring: Any, config: ModelConfig, where: Path) -> dict[str, list[list[int]]] | None:
    """None, or per-layer permutations: head_order [layers][heads], neuron_order [layers][ffn]."""
    if rewiring is None:
        return None
    sizes = {"head_order": config.num_heads, "neuron_order": config.intermediate_size}
    for key, size in sizes.items():
        orders = rewiring.get(key) if isinstance(rewiring, dict) else None
        if (not isinstance(orders, list) or len(orders) != config.num_layers
                or any(sorted(order) != list(range(size)) for order in orders)):
            raise InputError(f"{where}: rewiring.{key} must be {config.num_layers} permutations of "
                             f"0..{size - 1} (one per layer)")
    return rewiring


def _load_exact(module: torch.nn.Module, tensors: Mapping[str, torch.Tensor], source: Path, prefix: str) -> None:
    """Copy ``tensors`` into ``module``: every name present, every shape equal, nothing extra."""
    expected = {prefix + name: tensor for name, tensor in module.state_dict().items()}
    missing = sorted(set(expected) - set(tensors))
    extra = sorted(set(tensors) - set(expected))
    if missing:
        raise InputError(f"{source}: missing tensor(s) {missing[:5]} ({len(missing)} in all)")
    if extra:
        raise InputError(f"{source}: unexpected tensor(s) {extra[:5]} ({len(extra)} in all)")
    with torch.no_grad():
        for name, target in expected.items():
            if tuple(tensors[name].shape) != tuple(target.shape):
                raise InputError(f"{source}: tensor {name!r} has shape {list(tensors[name].shape)}, "
                                 f"expected {list(target.shape)}")
            target.copy_(tensors[name].to(target.dtype))


# ---------------------------------------------------------------------------------------------
# Saving and export


@contextmanager
def _atomic_directory(directory: str | os.PathLike) -> Iterator[Path]:
    """Write into a temp directory beside ``directory``, then swap it in; on any error the old one stays.

    An existing directory is only replaced when it is a model directory (holds config.json or is empty)."""
    target = Path(directory)
    if target.exists() and (not target.is_dir() or (any(target.iterdir()) and not (target / HF_CONFIG).exists())):
        raise InputError(f"{target}: exists and is not a model directory; refusing to overwrite it")
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent))
    try:
        yield staging
        if target.exists():
            retired = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".old", dir=target.parent))
            os.replace(target, retired / target.name)
            os.replace(staging, target)
            shutil.rmtree(retired, ignore_errors=True)
        else:
            os.replace(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def _save_safetensors(tensors: Mapping[str, torch.Tensor], path: Path) -> None:
    from safetensors.torch import save_file

    save_file({name: tensor.detach().contiguous().cpu() for name, tensor in tensors.items()}, str(path),
              metadata={"format": "pt"})


def _write_json(value: Any, path: Path) -> None:
    path.write_text(json.dumps(value, indent=2, allow_nan=False) + "\n", encoding="utf-8")


def _check_metadata(metadata: Any) -> None:
    if not isinstance(metadata, dict):
        raise ValueError(f"model.metadata must be a dict, found {type(metadata).__name__}")
    for key, value in metadata.items():
        try:
            json.dumps({key: value}, allow_nan=False)
        except (TypeError, ValueError) as error:
            raise ValueError(f"model.metadata[{key!r}] cannot be saved as JSON: {error}") from None


def manifest_of(model: DynamicCrossEncoder) -> dict[str, Any]:
    """The rankshrink.json contents for ``model``."""
    config = model.config
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "widths": list(config.widths),
        "depths": list(config.depths),
        # Written out so a reader sees the rounding rules without running code:
        "heads_at_width": {str(w): model.heads_for(w) for w in config.widths},
        "neurons_at_width": {str(w): model.neurons_for(w) for w in config.widths},
        "depth_layers": config.depth_layers,
        "layers_at_depth": {str(d): model.layers_for(d) for d in config.depths},
        "exit_layers": list(config.exit_layers),
        "exit_pooling": config.exit_pooling,
        "exit_heads_file": EXIT_WEIGHTS,
        "rewiring": model.rewiring,
        "metadata": model.metadata,
    }


def save_model(model: DynamicCrossEncoder, directory: str | os.PathLike) -> Path:
    """Write ``model`` as a rankshrink model directory (atomically: an interrupted save leaves the old one).

    >>> save_model(model, "models/minilm-dyna")    # doctest: +SKIP
    """
    if model.tokenizer is None:   # load_model would refuse the directory
        raise InputError(f"{directory}: the model has no tokenizer to save with it; set model.tokenizer first")
    _check_metadata(model.metadata)
    manifest = manifest_of(model)
    hf_config = model.config.to_hf(model.hf_config)
    with _atomic_directory(directory) as staging:
        _write_json(hf_config, staging / HF_CONFIG)
        _save_safetensors(model.hf_state_dict(), staging / BACKBONE_WEIGHTS)
        if model.config.exit_layers:
            _save_safetensors({f"exits.{name}": tensor for name, tensor in model.exits.state_dict().items()},
                              staging / EXIT_WEIGHTS)
        _save_tokenizer(model.tokenizer, staging)
        _write_json(manifest, staging / MANIFEST)
    return Path(directory)


def _as_plain_bert(small: DynamicCrossEncoder) -> DynamicCrossEncoder:
    """The same function with as many heads as hidden_size / head_size: dropped heads come back as zeros.

    Transformers 5 removed head pruning (``prune_heads`` / config ``pruned_heads``) and always projects
    attention to hidden_size, so a plain BERT cannot hold fewer heads. A zero head adds exactly nothing: its
    Q and K are 0 (uniform attention), its V is 0, and the output projection's columns for it are 0."""
    config = small.config
    full_heads = config.hidden_size // config.head_size
    if config.num_heads == full_heads:
        return small
    padded = DynamicCrossEncoder.blank(replace(config, num_heads=full_heads), tokenizer=small.tokenizer)
    padded.to(next(small.parameters()).dtype)
    state = padded.state_dict()
    with torch.no_grad():
        for name, tensor in small.state_dict().items():
            target = state[name]
            target.zero_()
            target[tuple(slice(0, size) for size in tensor.shape)] = tensor
    padded.hf_config = small.hf_config
    return padded


def export_hf(model: DynamicCrossEncoder, directory: str | os.PathLike, width: float = 1.0,
              depth: float = 1.0) -> Path:
    """Write the (``width``, ``depth``) sub-network as a plain ``BertForSequenceClassification`` directory
    (fewer layers, smaller FFN; see ``_as_plain_bert`` for heads) that
    ``AutoModelForSequenceClassification.from_pretrained`` loads, with the tokenizer.

    >>> export_hf(model, "models/minilm-w50-d50", width=0.5, depth=0.5)   # doctest: +SKIP
    """
    small = model.subnetwork(width, depth)
    plain = _as_plain_bert(small)
    hf_config = plain.config.to_hf(model.hf_config)
    with _atomic_directory(directory) as staging:
        _write_json(hf_config, staging / HF_CONFIG)
        _save_safetensors(plain.hf_state_dict(), staging / BACKBONE_WEIGHTS)
        _write_json({"exported_from_rankshrink": small.metadata["subnetwork"]}, staging / "rankshrink_export.json")
        if model.tokenizer is not None:
            _save_tokenizer(model.tokenizer, staging)
    return Path(directory)


def _save_tokenizer(tokenizer: Any, directory: Path) -> None:
    """``save_pretrained``, without the truncation and padding of the tokenizer's last call: a fast
    tokenizer keeps them and would write them into tokenizer.json, so two saves of one model would differ."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        tokenizer.save_pretrained(str(directory))
        return
    truncation, padding = backend.truncation, backend.padding
    backend.no_truncation()
    backend.no_padding()
    try:
        tokenizer.save_pretrained(str(directory))
    finally:
        if truncation is not None:
            backend.enable_truncation(**truncation)
        if padding is not None:
            backend.enable_padding(**padding)


class _ScoreOnly(torch.nn.Module):
    """(input_ids, attention_mask, token_type_ids) → final scores, for tracing."""

    def __init__(self, model: DynamicCrossEncoder):
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask, token_type_ids):
        mask = self.model.attention_mask_for(attention_mask, skip_if_full=False)
        hidden = self.model.embed(input_ids, token_type_ids)
        for index in range(self.model.config.num_layers):
            hidden = self.model.run_layer(index, hidden, mask)
        return self.model.final_score(hidden)


def export_onnx(model: DynamicCrossEncoder, path: str | os.PathLike, width: float = 1.0, depth: float = 1.0,
                opset: int = 17) -> Path:
    """Write the (``width``, ``depth``) sub-network as an ONNX graph: inputs ``input_ids``, ``attention_mask``,
    ``token_type_ids`` ([batch, sequence] int64), output ``score`` [batch]. Heads, neurons and layers are
    truly removed (the graph is the physically smaller ``model.subnetwork``), fp32.

    >>> export_onnx(model, "minilm-w50-d50.onnx", width=0.5, depth=0.5)   # doctest: +SKIP
    """
    small = model.subnetwork(width, depth).float().eval()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    example = (torch.tensor([[2, 7, 3, 8, 9, 3], [2, 7, 3, 8, 3, 0]]) % small.config.vocab_size,
               torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 0]]),
               torch.tensor([[0, 0, 0, 1, 1, 1], [0, 0, 0, 1, 1, 0]]))
    axes = {0: "batch", 1: "sequence"}
    fd, staging = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        with warnings.catch_warnings():
            # The TorchScript-based exporter is deprecated in favour of torch.export's, which needs the extra
            # onnxscript package; for a plain encoder the two give the same graph.
            warnings.simplefilter("ignore", DeprecationWarning)
            torch.onnx.export(_ScoreOnly(small), example, staging, dynamo=False, opset_version=opset,
                              input_names=["input_ids", "attention_mask", "token_type_ids"], output_names=["score"],
                              dynamic_axes={"input_ids": axes, "attention_mask": axes, "token_type_ids": axes,
                                            "score": {0: "batch"}})
        os.replace(staging, path)
    except BaseException:
        Path(staging).unlink(missing_ok=True)
        raise
    return path
