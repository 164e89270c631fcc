"""The dynamic cross-encoder: equal to transformers at full size, really smaller when narrow or shallow,
building blocks the engine can run on shrinking batches, and everything training needs differentiable."""
from __future__ import annotations

import json
import warnings
from dataclasses import replace

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import rankshrink
from conftest import shared_path
from rankshrink.errors import InputError
from rankshrink.model import ModelConfig, UninitializedWeightsWarning, save_model
from test_model_fixtures import (QUERIES, hf_scores, pair_exits, pairs, spread_scores, tiny_dir,  # noqa: F401
                                 tiny_hf_cross_encoder)

GRID = [(w, d) for w in (0.25, 0.5, 0.75, 1.0) for d in (0.5, 0.75, 1.0)]


def load_quietly(path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UninitializedWeightsWarning)
        return rankshrink.load_model(path)


@pytest.mark.parametrize("act", ["gelu", "gelu_new", "relu"])
def test_full_network_equals_transformers_on_a_tiny_random_bert(tmp_path, act):
    hf_model, tokenizer = tiny_hf_cross_encoder(tmp_path / "tiny", act=act)
    model = load_quietly(tmp_path / "tiny")
    queries, passages = pairs(12)
    expected = hf_scores(hf_model, tokenizer, queries, passages)
    assert expected.std() > 0.1  # the pairs really score differently
    assert (model.score(queries, passages) - expected).abs().max() <= 1e-5
    # one padded batch through forward, as the engine would
    batch = model.tokenize(queries, passages, max_length=64)
    assert not bool(batch["attention_mask"].all())
    with torch.no_grad():
        out = model(batch["input_ids"], batch["attention_mask"], batch["token_type_ids"])
    assert (out.score - expected).abs().max() <= 1e-5


def test_full_network_equals_transformers_on_minilm(tmp_path, dl19):
    from transformers import AutoModel, AutoModelForSequenceClassification, AutoTokenizer

    from rankshrink.data import read_topics

    minilm = shared_path("models", "all-MiniLM-L6-v2")
    with pytest.warns(UninitializedWeightsWarning, match="classifier.weight"):
        model = spread_scores(rankshrink.load_model(minilm))   # a BertModel: the classifier is new
    topics = list(read_topics(dl19 / "topics.tsv").values())[:4]
    passages = ["The Manhattan Project was a research and development undertaking during World War II.",
                "Cats are small, carnivorous mammals that are often kept as pets. " * 6,
                "rsv is a common respiratory virus", "a"]
    queries = [topics[i % len(topics)] for i in range(8)]
    texts = [passages[i % len(passages)] for i in range(8)]
    tokenizer = AutoTokenizer.from_pretrained(minilm)
    batch = tokenizer(queries, texts, truncation="only_second", max_length=96, padding=True, return_tensors="pt")
    # the backbone alone, against transformers' BertModel on the very same files
    backbone = AutoModel.from_pretrained(minilm).eval()
    with torch.no_grad():
        theirs = backbone(**batch).last_hidden_state
        ours = model(batch["input_ids"], batch["attention_mask"], batch["token_type_ids"],
                     output_hidden_states=True).hidden_states[-1]
    real = batch["attention_mask"].bool()
    assert (ours[real] - theirs[real]).abs().max() <= 1e-5
    # the whole cross-encoder (with the classifier we initialised), saved and read back by transformers
    save_model(model, tmp_path / "minilm")
    classifier = AutoModelForSequenceClassification.from_pretrained(tmp_path / "minilm").eval()
    with torch.no_grad():
        expected = classifier(**batch).logits.squeeze(-1)
    assert expected.std() > 0.1
    assert (model.score(queries, texts, max_length=96) - expected).abs().max() <= 1e-5


def test_depth_drops_layers_evenly_and_width_rounds_up():
    six = ModelConfig(num_layers=6)
    assert six.layers_for(0.5) == [0, 2, 4]
    assert six.layers_for(0.75) == [0, 1, 2, 4, 5]   # 4.5 layers: rounded up
    assert six.layers_for(1.0) == [0, 1, 2, 3, 4, 5]
    twelve = ModelConfig(num_layers=12, hidden_size=768, num_heads=12, head_size=64, intermediate_size=3072)
    assert twelve.layers_for(0.5) == [0, 2, 4, 6, 8, 10]                 # DynaBERT's own lists
    assert twelve.layers_for(0.75) == [0, 1, 2, 4, 5, 6, 8, 9, 10]
    assert [twelve.heads_for(w) for w in (0.25, 0.5, 0.75, 1.0)] == [3, 6, 9, 12]
    assert [six.neurons_for(w) for w in (0.25, 0.5, 0.75, 1.0)] == [384, 768, 1152, 1536]
    assert ModelConfig(num_layers=10).layers_for(0.7) == [0, 1, 2, 4, 5, 7, 8]  # 0.7·10 is 7.000000000000001
    with pytest.raises(ValueError, match="width"):
        six.heads_for(0)
    with pytest.raises(ValueError, match="depth"):
        six.layers_for(1.5)


class MatmulFlops(TorchDispatchMode):
    """Counts the FLOPs of every matmul and attention kernel that actually runs, from the operand shapes."""

    def __init__(self):
        super().__init__()
        self.total = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = str(func)
        if name == "aten.addmm.default":                      # bias, [m, k], [k, n]
            (m, k), n = args[1].shape, args[2].shape[1]
            self.total += 2 * m * k * n
        elif name.startswith("mkldnn._linear_pointwise"):     # x [..., k], (binary: residual), weight [n, k]
            x, weight = args[0], args[2] if name.endswith("binary") else args[1]
            self.total += 2 * (x.numel() // x.shape[-1]) * weight.shape[0] * weight.shape[1]
        elif "scaled_dot_product" in name:                    # q [b, heads, length, d]: Q·Kᵀ and A·V
            b, heads, length, size = args[0].shape
            self.total += 2 * 2 * b * heads * length * args[1].shape[2] * size
        elif name in ("aten.mm.default", "aten.bmm.default", "aten.matmul.default"):
            raise AssertionError(f"uncounted matmul {name}")
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("width,depth", [(1.0, 1.0), (0.5, 1.0), (0.25, 0.5), (0.75, 0.75)])
@pytest.mark.parametrize("kernels", ["fused (inference)", "plain (autograd)"])
def test_matmuls_shrink_with_width_and_depth_as_the_flops_formula_says(tiny_dir, width, depth, kernels):
    model = load_quietly(tiny_dir)
    batch, length = 3, 20
    ids = torch.randint(5, len(model.tokenizer), (batch, length))
    with torch.set_grad_enabled(kernels.startswith("plain")), MatmulFlops() as counter:
        model(ids, torch.ones_like(ids), width=width, depth=depth)
    assert counter.total == batch * model.flops(width, depth, length)


def test_dropped_heads_and_neurons_are_never_read(tiny_dir):
    model = load_quietly(tiny_dir)
    queries, passages = pairs(6)
    before = model.score(queries, passages, width=0.5)
    inner, neurons = model.heads_for(0.5) * model.config.head_size, model.neurons_for(0.5)
    with torch.no_grad():
        for layer in model.layers:
            layer.attention.qkv.weight[3 * inner:] = float("nan")
            layer.attention.output.weight[:, inner:] = float("nan")
            layer.ffn.up.weight[neurons:] = float("nan")
            layer.ffn.down.weight[:, neurons:] = float("nan")
    assert torch.equal(model.score(queries, passages, width=0.5), before)
    assert model.score(queries, passages, width=1.0).isnan().all()


def test_flops_ratios():
    from rankshrink.model import DynamicCrossEncoder

    model = DynamicCrossEncoder(ModelConfig())   # MiniLM-L6's shape
    layer, last = model.layer_flops(1.0, 96), model.layer_flops(1.0, 96, first_token_only=True)
    assert 3.5e8 < layer < 3.6e8         # ≈ 0.354 GFLOPs per layer and 96-token pair
    assert last / layer == pytest.approx(0.248, abs=1e-3)    # Q, K, V for every token, the rest for [CLS]
    full = model.flops(1.0, 1.0, 96)
    assert full == 5 * layer + last + model.head_flops()     # ≈ 1.86 GFLOPs per pair
    assert model.flops(0.5, 1.0, 96) / full == pytest.approx(0.5, abs=1e-3)
    assert model.flops(1.0, 0.5, 96) == 2 * layer + last + model.head_flops()
    assert model.layer_flops(0.5, 96) / layer == pytest.approx(0.5, abs=1e-3)


def test_subnetwork_is_physically_smaller_and_scores_the_same(tiny_dir):
    model = load_quietly(tiny_dir)
    queries, passages = pairs(8)
    for width, depth in GRID:
        small = model.subnetwork(width, depth)
        assert small.config.num_layers == len(model.layers_for(depth))
        assert small.layers[0].attention.qkv.weight.shape[0] == 3 * model.heads_for(width) * model.config.head_size
        assert small.layers[0].ffn.up.weight.shape[0] == model.neurons_for(width)
        diff = (small.score(queries, passages) - model.score(queries, passages, width=width, depth=depth)).abs()
        assert diff.max() <= 1e-5, (width, depth)


def test_forward_returns_exit_scores_and_hidden_states(tiny_dir):
    model = load_quietly(tiny_dir)
    batch = model.tokenize(*pairs(5))
    with torch.no_grad():
        out = model(batch["input_ids"], batch["attention_mask"], batch["token_type_ids"], depth=0.75,
                    exits="all", output_hidden_states=True)
    assert out.layers == [0, 1, 2]
    assert sorted(out.exit_scores) == [0, 1, 2]
    assert len(out.hidden_states) == 4                  # embeddings + three executed layers
    # the last physical layer's exit is the final head
    with torch.no_grad():
        full = model(batch["input_ids"], batch["attention_mask"], batch["token_type_ids"], exits=[3])
    assert torch.equal(full.exit_scores[3], full.score)
    with pytest.raises(ValueError, match=r"not executed"):
        model(batch["input_ids"], batch["attention_mask"], depth=0.5, exits=[1])


def test_pair_exit_heads_read_only_real_tokens_and_survive_a_round_trip(tiny_dir, tmp_path):
    model = pair_exits(load_quietly(tiny_dir))
    queries, passages = pairs(6)
    batch = model.tokenize(queries, passages)
    assert not bool(batch["attention_mask"].all())          # some pairs are padded
    with torch.no_grad():
        together = model(batch["input_ids"], batch["attention_mask"], batch["token_type_ids"], exits="all")
        for i in range(6):   # each pair alone, unpadded: the same exit scores
            alone = model.tokenize(queries[i:i + 1], passages[i:i + 1])
            out = model(alone["input_ids"], alone["attention_mask"], alone["token_type_ids"], exits="all")
            for layer, scores in out.exit_scores.items():
                assert abs(float(scores[0]) - float(together.exit_scores[layer][i])) <= 1e-5
    assert together.exit_scores[0].std() > 0.1                # the spread classifiers make a 1e-5 check real
    save_model(model, tmp_path / "pair")
    loaded = load_quietly(tmp_path / "pair")
    assert loaded.config.exit_pooling == "pair"
    with torch.no_grad():
        again = loaded(batch["input_ids"], batch["attention_mask"], batch["token_type_ids"], exits="all")
    for layer in together.exit_scores:
        assert torch.equal(again.exit_scores[layer], together.exit_scores[layer])


def test_a_manifest_without_exit_pooling_reads_cls_heads_and_a_bad_one_is_named(tiny_dir, tmp_path):
    save_model(load_quietly(tiny_dir), tmp_path / "cls")
    manifest = json.loads((tmp_path / "cls" / "rankshrink.json").read_text())
    del manifest["exit_pooling"]                             # as models written before pair pooling
    (tmp_path / "cls" / "rankshrink.json").write_text(json.dumps(manifest))
    assert load_quietly(tmp_path / "cls").config.exit_pooling == "cls"
    (tmp_path / "cls" / "rankshrink.json").write_text(json.dumps({**manifest, "exit_pooling": "max"}))
    with pytest.raises(InputError, match=r"rankshrink.json: exit_pooling 'max' is not supported"):
        load_quietly(tmp_path / "cls")


def test_a_prefix_depth_runs_the_first_layers_and_ends_at_their_exit_head(tiny_dir, tmp_path):
    model = pair_exits(load_quietly(tiny_dir))
    model.config = replace(model.config, depth_layers="prefix")
    assert [model.layers_for(d) for d in (0.5, 0.75, 1.0)] == [[0, 1], [0, 1, 2], [0, 1, 2, 3]]
    batch = model.tokenize(*pairs(6))
    inputs = (batch["input_ids"], batch["attention_mask"], batch["token_type_ids"])
    with torch.no_grad():
        full = model(*inputs, exits="all")
        assert torch.equal(model(*inputs, depth=0.5).score, full.exit_scores[1])
        assert torch.equal(model(*inputs, depth=0.75).score, full.exit_scores[2])
        assert torch.equal(model(*inputs, exits=[3]).exit_scores[3], full.score)     # depth 1: the final head
    assert full.exit_scores[1].std() > 0.1
    save_model(model, tmp_path / "prefix")
    loaded = load_quietly(tmp_path / "prefix")
    assert loaded.config.depth_layers == "prefix"
    assert torch.equal(loaded.score(*pairs(6), depth=0.5), model.score(*pairs(6), depth=0.5))
    assert torch.equal(loaded.subnetwork(0.5, 1.0).score(*pairs(6)), model.score(*pairs(6), width=0.5))
    with pytest.raises(InputError, match=r"depth 0.5 of this model ends at the exit head after layer 1"):
        model.subnetwork(1.0, 0.5)
    manifest = json.loads((tmp_path / "prefix" / "rankshrink.json").read_text())
    (tmp_path / "prefix" / "rankshrink.json").write_text(json.dumps({**manifest, "depth_layers": "first"}))
    with pytest.raises(InputError, match=r"rankshrink.json: depth_layers 'first' is not supported"):
        load_quietly(tmp_path / "prefix")
    del manifest["depth_layers"]                             # as models written before prefix depths
    (tmp_path / "prefix" / "rankshrink.json").write_text(json.dumps(manifest))
    assert load_quietly(tmp_path / "prefix").layers_for(0.5) == [0, 2]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_layer_for_the_first_token_alone_is_that_token_of_the_whole_layer(tiny_dir, dtype):
    """The engine runs the last layer for [CLS] alone: the same row, the other tokens still attended to."""
    model = load_quietly(tiny_dir).to(dtype)
    batch = model.tokenize(*pairs(7))                       # padded: the pairs differ in length
    mask = model.attention_mask_for(batch["attention_mask"])
    with torch.inference_mode():
        hidden = model.run_layer(0, model.embed(batch["input_ids"], batch["token_type_ids"]), mask)
        for width in (1.0, 0.5):
            whole = model.run_layer(1, hidden, mask, width)
            first = model.run_layer(1, hidden, mask, width, first_token_only=True)
            assert first.shape == (7, 1, model.config.hidden_size)
            assert torch.allclose(first[:, 0].float(), whole[:, 0].float(), atol=1e-5 if dtype == torch.float32 else 2e-2)


def test_building_blocks_on_a_shrinking_batch_match_forward(tiny_dir):
    """What the engine does: run layer by layer, drop exited passages from the batch between layers."""
    model = load_quietly(tiny_dir)
    batch = model.tokenize(*pairs(10))
    width, depth = 0.75, 1.0
    with torch.no_grad():
        expected = model(batch["input_ids"], batch["attention_mask"], batch["token_type_ids"],
                         width=width, depth=depth, exits="all")
        hidden = model.embed(batch["input_ids"], batch["token_type_ids"])
        mask = batch["attention_mask"]
        alive = torch.arange(10)
        for index in model.layers_for(depth):
            hidden = model.run_layer(index, hidden, mask, width)
            assert torch.allclose(model.exit_score(index, hidden), expected.exit_scores[index][alive], atol=1e-5)
            keep = torch.arange(len(alive)) % 2 == 0 if len(alive) > 2 else torch.ones(len(alive), dtype=torch.bool)
            rows = keep.nonzero().squeeze(1)
            hidden, mask, alive = hidden.index_select(0, rows), mask.index_select(0, rows), alive[rows]
        final = model.final_score(hidden)
    assert (final - expected.score[alive]).abs().max() <= 1e-5


def test_everything_training_needs_is_differentiable(tiny_dir):
    model = load_quietly(tiny_dir).train()
    batch = model.tokenize(*pairs(6))
    teacher = load_quietly(tiny_dir).eval()
    with torch.no_grad():
        target = teacher(batch["input_ids"], batch["attention_mask"], batch["token_type_ids"],
                         output_hidden_states=True)
    out = model(batch["input_ids"], batch["attention_mask"], batch["token_type_ids"], width=0.5, depth=0.5,
                exits="all", output_hidden_states=True)
    hidden_mse = sum(torch.nn.functional.mse_loss(h, target.hidden_states[layer + 1])
                     for h, layer in zip(out.hidden_states[1:], out.layers))
    loss = (out.score - target.score).pow(2).mean() + sum(s.pow(2).mean() for s in out.exit_scores.values()) \
        + hidden_mse
    loss.backward()
    assert model.layers[0].attention.qkv.weight.grad.abs().sum() > 0
    assert model.layers[0].attention.qkv.weight.grad[3 * model.heads_for(0.5) * model.config.head_size:].abs().sum() == 0
    assert model.layers[1].ffn.up.weight.grad is None                  # layer 1 is not run at depth 0.5
    assert model.exits["2"].classifier.weight.grad.abs().sum() > 0
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    before = model.head.classifier.weight.detach().clone()
    optimizer.step()
    assert not torch.equal(before, model.head.classifier.weight)
    # head / neuron masks carry a gradient (DynaBERT's importance)
    head_mask = torch.ones(4, 4, requires_grad=True)
    neuron_mask = torch.ones(4, 64, requires_grad=True)
    out = model.eval()(batch["input_ids"], batch["attention_mask"], head_mask=head_mask, neuron_mask=neuron_mask)
    out.score.sum().backward()
    assert head_mask.grad.abs().min() > 0 and neuron_mask.grad.abs().sum() > 0


def test_bf16_runs_and_stays_close(tiny_dir):
    model = load_quietly(tiny_dir)
    queries, passages = pairs(12)
    full = model.score(queries, passages, width=0.5, depth=0.75)
    low = model.clone().to(torch.bfloat16)
    assert low.layers[0].attention.qkv.weight.dtype == torch.bfloat16
    scores = low.score(queries, passages, width=0.5, depth=0.75)
    assert scores.dtype == torch.float32
    assert (scores - full).abs().max() < 0.1 * full.abs().max() + 0.05


@pytest.mark.parametrize("slice_bytes", [2 << 20, 5 * 10 * 10 * 2])   # every head at once; 5 heads a slice
def test_bf16_attention_equals_sdpa_with_and_without_padding(monkeypatch, slice_bytes):
    from rankshrink.model import dynabert
    from rankshrink.model.dynabert import bf16_attention
    monkeypatch.setattr(dynabert, "ATTENTION_SLICE_BYTES", slice_bytes)
    torch.manual_seed(0)
    q, k, v = (torch.randn(3, 4, 10, 8).to(torch.bfloat16) for _ in range(3))
    lengths = torch.tensor([10, 7, 1])
    mask = (torch.arange(10)[None, :] < lengths[:, None])[:, None, None, :]
    for m in (mask, None):
        expected = torch.nn.functional.scaled_dot_product_attention(
            q.float(), k.float(), v.float(), attn_mask=m)
        got = bf16_attention(q, k, v, m)
        assert got.dtype == torch.bfloat16 and got.shape == expected.shape
        assert (got.float() - expected).abs().max() < 0.03
    # a padded key gets no weight: changing it changes nothing
    v2 = v.clone()
    v2[1, :, 8] = 100.0
    assert torch.equal(bf16_attention(q, k, v2, mask)[1], bf16_attention(q, k, v, mask)[1])
    # a mask of any other shape is SDPA's
    full = torch.ones(3, 1, 10, 10, dtype=torch.bool)
    assert torch.equal(bf16_attention(q, k, v, full),
                       torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=full))


def test_score_keeps_input_order_and_truncates_only_the_passage(tiny_dir):
    model = load_quietly(tiny_dir)
    queries, passages = pairs(9)
    together = model.score(queries, passages, batch_size=4)
    one_by_one = torch.cat([model.score([q], [p]) for q, p in zip(queries, passages)])
    assert (together - one_by_one).abs().max() <= 1e-5
    assert torch.equal(model.score("cat", ["a cat", "dog"]), model.score(["cat", "cat"], ["a cat", "dog"]))
    long_passage = "the cat sat on the mat " * 40
    encoded = model.encode([QUERIES[0]], [long_passage], max_length=16)
    ids = encoded["input_ids"][0]
    assert len(ids) == 16 and ids[:8] == model.encode([QUERIES[0]], ["dog"])["input_ids"][0][:8]  # query whole
    long_query = "why is the sky blue " * 10
    assert len(model.encode([long_query], ["dog"], max_length=16)["input_ids"][0]) == 16  # query cut too
    with pytest.raises(ValueError, match="one query per passage"):
        model.score(["a", "b"], ["c"])
