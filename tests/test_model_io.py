"""Model directories: exact round trips, errors that name the file and tensor, plain-HF and ONNX exports."""
from __future__ import annotations

import json
import warnings

import pytest
import torch
from safetensors.torch import load_file, save_file

import rankshrink
from conftest import shared_path
from rankshrink.errors import InputError
from rankshrink.model import (UninitializedWeightsWarning, export_hf, export_onnx, head_neuron_importance, rewire,
                              save_model)
from test_model_fixtures import (hf_scores, pairs, spread_scores, tiny_dir,  # noqa: F401
                                 tiny_hf_cross_encoder, tiny_tokenizer)


def load_quietly(path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UninitializedWeightsWarning)
        return rankshrink.load_model(path)


@pytest.fixture
def saved(tiny_dir, tmp_path):
    """A rewired tiny model with distinct exit heads and metadata, saved as a rankshrink directory."""
    model = load_quietly(tiny_dir)
    with torch.no_grad():
        for exit_head in model.exits.values():
            exit_head.classifier.weight.add_(0.3 * torch.randn_like(exit_head.classifier.weight))
    batch = model.tokenize(*pairs(8), max_length=32)
    batch["targets"] = torch.randn(8)
    rewire(model, head_neuron_importance(model, [batch], progress=False))
    model.metadata = {"calibration": {"exit_thresholds": {"1": [-1.5, 2.0]}}, "profile": [{"width": 0.5, "ms": 3.2}]}
    save_model(model, tmp_path / "saved")
    return model, tmp_path / "saved"


def test_save_load_round_trip_is_identical(saved):
    model, directory = saved
    assert {path.name for path in directory.iterdir()} >= {
        "config.json", "model.safetensors", "rankshrink.json", "rankshrink.safetensors", "tokenizer.json"}
    with warnings.catch_warnings():
        warnings.simplefilter("error")   # a complete rankshrink directory loads without any warning
        loaded = rankshrink.load_model(directory)
    ours, theirs = model.state_dict(), loaded.state_dict()
    assert ours.keys() == theirs.keys()
    assert all(torch.equal(ours[name], theirs[name]) for name in ours)
    assert loaded.metadata == model.metadata
    assert loaded.rewiring == model.rewiring
    assert loaded.config == model.config
    queries, passages = pairs(8)
    for width, depth in [(1.0, 1.0), (0.5, 0.75), (0.25, 0.5)]:
        assert torch.equal(loaded.score(queries, passages, width=width, depth=depth),
                           model.score(queries, passages, width=width, depth=depth))
    manifest = json.loads((directory / "rankshrink.json").read_text())
    assert manifest["layers_at_depth"] == {"0.5": [0, 2], "0.75": [0, 1, 2], "1.0": [0, 1, 2, 3]}
    assert manifest["exit_layers"] == [0, 1, 2] and manifest["metadata"]["calibration"]
    # saving again over it works, and the backbone stays a plain transformers cross-encoder
    save_model(loaded, directory)
    from transformers import AutoModelForSequenceClassification

    hf = AutoModelForSequenceClassification.from_pretrained(directory).eval()
    assert (hf_scores(hf, loaded.tokenizer, queries, passages) - model.score(queries, passages)).abs().max() <= 1e-5


def test_a_wrong_shape_names_the_tensor_and_both_shapes(saved):
    _, directory = saved
    tensors = load_file(directory / "model.safetensors")
    tensors["bert.encoder.layer.1.intermediate.dense.weight"] = torch.zeros(60, 32)
    save_file(tensors, directory / "model.safetensors")
    with pytest.raises(InputError) as error:
        rankshrink.load_model(directory)
    message = str(error.value)
    assert "model.safetensors" in message and "'bert.encoder.layer.1.intermediate.dense.weight'" in message
    assert "[60, 32]" in message and "[64, 32]" in message


def test_a_wrong_exit_head_shape_is_named_too(saved):
    _, directory = saved
    tensors = load_file(directory / "rankshrink.safetensors")
    tensors["exits.2.pooler.weight"] = torch.zeros(32, 31)
    save_file(tensors, directory / "rankshrink.safetensors")
    with pytest.raises(InputError, match=r"rankshrink.safetensors: tensor 'exits.2.pooler.weight' has shape "
                                         r"\[32, 31\], expected \[32, 32\]"):
        rankshrink.load_model(directory)


@pytest.mark.parametrize("name", ["model.safetensors", "rankshrink.safetensors", "config.json", "tokenizer.json"])
def test_a_missing_file_is_named(saved, name):
    _, directory = saved
    (directory / name).unlink()
    if name == "tokenizer.json":
        (directory / "vocab.txt").unlink(missing_ok=True)
    with pytest.raises(InputError, match=name.split(".")[0]):
        rankshrink.load_model(directory)


def test_missing_and_unexpected_tensors_are_named(tiny_dir):
    tensors = load_file(tiny_dir / "model.safetensors")
    del tensors["bert.encoder.layer.2.attention.self.key.bias"]
    tensors["bert.encoder.layer.9.output.dense.weight"] = torch.zeros(2, 2)
    save_file(tensors, tiny_dir / "model.safetensors")
    with pytest.raises(InputError, match="missing tensor.*layer.2.attention.self.key.bias"):
        rankshrink.load_model(tiny_dir)
    tensors["bert.encoder.layer.2.attention.self.key.bias"] = torch.zeros(32)
    save_file(tensors, tiny_dir / "model.safetensors")
    with pytest.raises(InputError, match="unexpected tensor.*layer.9.output.dense.weight"):
        rankshrink.load_model(tiny_dir)


def test_a_bert_model_without_pooler_or_classifier_loads_with_a_warning(tmp_path):
    from transformers import BertConfig, BertModel

    tokenizer = tiny_tokenizer(tmp_path / "encoder")
    config = BertConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=48, max_position_embeddings=64)
    BertModel(config, add_pooling_layer=False).save_pretrained(tmp_path / "encoder")
    tokenizer.save_pretrained(tmp_path / "encoder")
    with pytest.warns(UninitializedWeightsWarning, match=r"bert.pooler.dense.weight.*classifier.weight.*initialised"):
        model = rankshrink.load_model(tmp_path / "encoder")
    assert model.score("cat", ["the cat sat"]).isfinite().all()


def test_a_multi_label_classifier_is_refused(tmp_path):
    from transformers import BertConfig, BertForSequenceClassification

    tokenizer = tiny_tokenizer(tmp_path / "two")
    config = BertConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=48, num_labels=2)
    BertForSequenceClassification(config).save_pretrained(tmp_path / "two")
    with pytest.raises(InputError, match=r"'classifier.weight' has shape \[2, 32\], expected \[1, 32\]"):
        rankshrink.load_model(tmp_path / "two")


def test_pickle_checkpoints_are_refused_and_unknown_ids_explained(tmp_path):
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "config.json").write_text(json.dumps({"model_type": "bert"}))
    (tmp_path / "old" / "pytorch_model.bin").write_bytes(b"not loaded")
    (tmp_path / "old" / "vocab.txt").write_text("[PAD]\n")
    with pytest.raises(InputError, match="pytorch_model.bin.*safetensors only"):
        rankshrink.load_model(tmp_path / "old")
    with pytest.raises(InputError, match="no-such-owner/no-such-model: not a local directory"):
        rankshrink.load_model("no-such-owner/no-such-model")   # tests run with HF_HUB_OFFLINE=1
    with pytest.raises(InputError, match="no such model directory"):
        rankshrink.load_model(tmp_path / "absent")


def test_save_refuses_bad_metadata_and_foreign_directories(tiny_dir, tmp_path):
    model = load_quietly(tiny_dir)
    model.metadata = {"profile": {"when": object()}}
    with pytest.raises(ValueError, match=r"metadata\['profile'\]"):
        save_model(model, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    model.metadata = {}
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "todo.txt").write_text("keep me")
    with pytest.raises(InputError, match="refusing to overwrite"):
        save_model(model, tmp_path / "notes")
    assert (tmp_path / "notes" / "todo.txt").read_text() == "keep me"


@pytest.mark.parametrize("width,depth", [(0.5, 0.5), (0.75, 0.75), (0.25, 1.0), (1.0, 1.0)])
def test_exported_subnetwork_loads_in_transformers_with_the_same_scores(saved, tmp_path, width, depth):
    from transformers import AutoModelForSequenceClassification

    model, _ = saved
    export_hf(model, tmp_path / "small", width=width, depth=depth)
    config = json.loads((tmp_path / "small" / "config.json").read_text())
    assert config["num_hidden_layers"] == len(model.layers_for(depth))
    assert config["intermediate_size"] == model.neurons_for(width)
    hf = AutoModelForSequenceClassification.from_pretrained(tmp_path / "small").eval()
    queries, passages = pairs(10)
    expected = model.score(queries, passages, width=width, depth=depth)
    assert (hf_scores(hf, model.tokenizer, queries, passages) - expected).abs().max() <= 1e-5
    # and rankshrink reads the export back as a plain checkpoint
    assert (load_quietly(tmp_path / "small").score(queries, passages) - expected).abs().max() <= 1e-5


def test_onnx_export_scores_like_the_dynamic_model(saved, tmp_path):
    onnxruntime = pytest.importorskip("onnxruntime", reason="onnxruntime is in the dev extra")
    model, _ = saved
    path = export_onnx(model, tmp_path / "small.onnx", width=0.5, depth=0.75)
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    queries, passages = pairs(10)
    batch = model.tokenize(queries, passages)
    assert not bool(batch["attention_mask"].all())   # padding goes through the graph too
    (scores,) = session.run(["score"], {name: batch[name].numpy() for name in
                                        ("input_ids", "attention_mask", "token_type_ids")})
    expected = model.score(queries, passages, width=0.5, depth=0.75)
    assert (torch.from_numpy(scores) - expected).abs().max() <= 1e-5


def test_minilm_subnetwork_exports_with_the_same_scores(tmp_path):
    from transformers import AutoModelForSequenceClassification

    model = spread_scores(load_quietly(shared_path("models", "all-MiniLM-L6-v2")))
    export_hf(model, tmp_path / "minilm-small", width=0.5, depth=0.75)
    hf = AutoModelForSequenceClassification.from_pretrained(tmp_path / "minilm-small").eval()
    queries = ["what is the daily life of thai people", "rsv disease symptoms"] * 3
    passages = ["Thai people mostly live in rural areas and farm rice.", "RSV causes mild, cold-like symptoms.",
                "The weather today is sunny.", "Bangkok is the capital of Thailand.", "Respiratory syncytial virus",
                "x"]
    expected = model.score(queries, passages, width=0.5, depth=0.75)
    assert expected.std() > 0.1
    assert (hf_scores(hf, model.tokenizer, queries, passages) - expected).abs().max() <= 1e-5


def test_a_save_does_not_write_the_last_calls_truncation_into_the_tokenizer(saved, tmp_path):
    model, directory = saved
    first = (directory / "tokenizer.json").read_text()
    model.encode(["a query"] * 2, ["a passage", "another passage"], max_length=24)
    save_model(model, tmp_path / "again")
    assert (tmp_path / "again" / "tokenizer.json").read_text() == first
    assert json.loads(first)["truncation"] is None
    # the tokenizer in memory keeps what the call set
    assert model.tokenizer.backend_tokenizer.truncation["max_length"] == 24
