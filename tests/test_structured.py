"""Structured pruning machinery (compress/structured.py) on tiny random models: the dependency groups are right
(removing a group gives exactly the model with that group's weights zeroed), GQA head groups stay consistent, the
importance arithmetic and the gradient statistics match hand computations."""
import copy

import pytest
import torch

from compress.core.errors import CompressError
from compress.model.tiny import tiny_model
from compress.sparse.structured import (
    aggregate,
    attention_coupled,
    choose_keep,
    discover,
    hidden_coupled,
    lm_gradients,
    mlp_coupled,
    remove_units,
    unit_scores,
    zero_units,
)

IDS = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(0))

CASES = [  # (arch, model kwargs, coupling, gqa, units removed)
    ("llama", {}, "attention", "kv", [1]),  # multi-head: one head = rows of q, k, v + columns of o
    ("llama", {"heads": 6, "kv_heads": 2, "hidden": 96}, "attention", "kv", [0]),  # a KV head with its 3 query heads
    ("llama", {"heads": 6, "kv_heads": 2, "hidden": 96}, "attention", "query", [1, 5]),  # one query head in each KV group
    ("opt", {}, "attention", "kv", [0, 3]),  # OPT: q, k, v rows and biases, out_proj columns
    ("llama", {"heads": 6, "kv_heads": 2, "hidden": 96}, "mlp", None, [0, 17, 100, 127]),  # gate, up rows; down cols
    ("opt", {}, "mlp", None, [3, 64, 99]),  # fc1 rows and bias, fc2 columns
]


@pytest.mark.parametrize("arch,kw,kind,gqa,units", CASES)
def test_removing_a_group_equals_zeroing_it(arch, kw, kind, gqa, units):
    model = tiny_model(arch, seed=0, dtype=torch.float64, layers=3, **kw)
    prefix, layouts = discover(model)
    for block in (0, 2):
        co = attention_coupled(prefix, block, layouts[block], gqa) if kind == "attention" else mlp_coupled(prefix, block, layouts[block])
        zeroed = copy.deepcopy(model)
        zero_units(zeroed, co, units)
        keep = [u for u in range(co.units) if u not in units]
        before = sum(p.numel() for p in model.parameters())
        remove_units(model, co, torch.tensor(keep), prefix=prefix, layouts=layouts)
        assert sum(p.numel() for p in model.parameters()) == before - len(units) * co.unit_cost(zeroed)
        with torch.no_grad():
            pruned, ref = model(input_ids=IDS).logits, zeroed(input_ids=IDS).logits
        assert (pruned - ref).abs().max().item() <= 1e-12  # the same computation minus exact zeros
        if kind == "mlp":
            assert layouts[block].channels == co.units - len(units)


def test_zeroing_a_wrong_group_changes_the_output():
    """The equality above is not vacuous: zeroing the removed head's neighbour instead gives other logits."""
    model = tiny_model("llama", seed=0, dtype=torch.float64, heads=6, kv_heads=2, hidden=96)
    prefix, layouts = discover(model)
    co = attention_coupled(prefix, 1, layouts[1], "kv")
    wrong = copy.deepcopy(model)
    zero_units(wrong, co, [1])
    remove_units(model, co, torch.tensor([1]), prefix=prefix, layouts=layouts)  # removes KV group 0
    with torch.no_grad():
        assert (model(input_ids=IDS).logits - wrong(input_ids=IDS).logits).abs().max() > 1e-3


def test_gqa_head_groups_stay_consistent():
    model = tiny_model("llama", seed=0, heads=6, kv_heads=2, hidden=96, layers=2)
    prefix, layouts = discover(model)
    lay = layouts[0]
    assert (lay.heads, lay.kv_heads, lay.head_dim, lay.q, lay.kv) == (6, 2, 16, "self_attn.q_proj", ["self_attn.k_proj", "self_attn.v_proj"])
    kv = attention_coupled(prefix, 0, lay, "kv")
    assert kv.units == 2 and [m.width for m in kv.members] == [48, 16, 16, 48]  # 3 query heads ride with their KV head
    q = attention_coupled(prefix, 1, layouts[1], "query")
    assert q.units == 6 and q.per_kv == 3 and [m.module.rsplit(".", 1)[-1] for m in q.members] == ["q_proj", "o_proj"]
    # The three least important query heads all sit in KV group 0; still one head goes from each group.
    scores = torch.tensor([0.1, 0.2, 0.3, 5.0, 6.0, 7.0], dtype=torch.float64)
    keep = choose_keep(scores, q, 1)
    assert keep.tolist() == [1, 2, 4, 5]
    with pytest.raises(CompressError, match="equal numbers from every KV group"):
        remove_units(model, q, torch.tensor([1, 2, 3]), prefix=prefix, layouts=layouts)
    remove_units(model, q, keep, prefix=prefix, layouts=layouts)
    remove_units(model, kv, torch.tensor([1]), prefix=prefix, layouts=layouts)
    a0, a1 = model.model.layers[0].self_attn, model.model.layers[1].self_attn
    assert (a0.q_proj.out_features, a0.k_proj.out_features, a0.num_key_value_groups) == (48, 16, 3)
    assert (a1.q_proj.out_features, a1.k_proj.out_features, a1.num_key_value_groups) == (64, 32, 2)
    assert (layouts[0].heads, layouts[0].kv_heads, layouts[1].heads, layouts[1].kv_heads) == (3, 1, 4, 2)
    with torch.no_grad():
        assert torch.isfinite(model(input_ids=IDS).logits).all()
        out = model.generate(IDS[:1, :5], max_new_tokens=4, do_sample=False, use_cache=True)
    assert out.shape == (1, 9)


def test_unit_scores_and_aggregation_by_hand():
    model = tiny_model("llama", seed=0, heads=4, kv_heads=2, layers=1)
    prefix, layouts = discover(model)
    co = attention_coupled(prefix, 0, layouts[0], "kv")
    attn = model.model.layers[0].self_attn
    sal = lambda name, p: p.detach().double()  # noqa: E731 - salience = the weight itself
    elem = unit_scores(model, co, sal, "element")
    vec = unit_scores(model, co, sal, "vector")
    q, k, o = attn.q_proj.weight.double(), attn.k_proj.weight.double(), attn.o_proj.weight.double()
    j = 1  # KV group 1: query heads 2, 3 (rows 32..63 of q), KV rows 16..31, columns 32..63 of o
    assert elem[0, j].item() == pytest.approx(q[32:64].abs().sum().item())
    assert elem[1, j].item() == pytest.approx(k[16:32].abs().sum().item())
    assert elem[3, j].item() == pytest.approx(o[:, 32:64].abs().sum().item())
    assert vec[3, j].item() == pytest.approx(o[:, 32:64].sum().abs().item())
    s = torch.tensor([[1.0, 4.0], [2.0, 0.5], [3.0, 1.0]], dtype=torch.float64)
    assert aggregate(s, "sum").tolist() == [6.0, 5.5]
    assert aggregate(s, "max").tolist() == [3.0, 4.0]
    assert aggregate(s, "last").tolist() == [3.0, 1.0]
    assert aggregate(s, "prod").argsort().tolist() == torch.tensor([6.0, 2.0]).argsort().tolist()


def test_gradients_and_fisher_match_hand_computation():
    from compress.kernels.losses import lm_loss

    model = tiny_model("llama", seed=0, layers=1)
    ids = torch.randint(0, 256, (4, 12), generator=torch.Generator().manual_seed(3))
    w = model.model.layers[0].mlp.down_proj.weight
    grad, fisher = lm_gradients(model, ids, {"w": w}, fisher=True, progress=False)
    batched, none = lm_gradients(model, ids, {"w": w}, progress=False)
    assert none is None and w.grad is None
    per = []
    for i in range(4):
        g, = torch.autograd.grad(lm_loss(model, {"input_ids": ids[i:i + 1]}), w)
        per.append(g)
    per = torch.stack(per)
    assert torch.allclose(grad["w"], per.mean(0), atol=1e-6)
    assert torch.allclose(batched["w"], per.mean(0), atol=1e-6)
    assert torch.allclose(fisher["w"], (per ** 2).mean(0), atol=1e-9)
    assert per.abs().max() > 1e-4  # a real gradient, not zeros


def test_hidden_channels_cover_the_whole_stream():
    model = tiny_model("llama", seed=0, layers=2, heads=4, kv_heads=2)
    prefix, layouts = discover(model)
    co = hidden_coupled(model, prefix, layouts)
    mods = [m.module for m in co.members]
    assert mods[0] == "model.embed_tokens" and "model.norm" in mods and "lm_head" not in mods  # tied: counted once
    assert co.unit_cost(model) == sum(p.numel() for p in model.parameters()) // 64  # every parameter has one hidden side
    remove_units(model, co, torch.arange(0, 64, 2))
    assert model.lm_head.weight is model.model.embed_tokens.weight and model.lm_head.weight.shape == (257, 32)
    with torch.no_grad():
        assert model(input_ids=IDS).logits.shape == (2, 24, 257)


def test_unsupported_structure_is_one_clear_error():
    import torch.nn as nn

    from compress.sparse.structured import block_layout

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.qkv, self.out = nn.Linear(8, 24), nn.Linear(8, 8)

        def forward(self, x):
            return self.out(self.qkv(x)[..., :8])

    cfg = type("C", (), {"hidden_size": 8, "num_attention_heads": 2})()
    with pytest.raises(CompressError, match="expected 4 groups of linears.*q,k,v \\| o \\| gate,up"):
        block_layout(Block(), torch.randn(1, 3, 8), {}, cfg)
