"""The coverage check: every decoder-block parameter compressed or listed as kept; fused MoE experts refused by the
methods that cannot compress them (tests/test_moe.py: the ones that can)."""
import pytest
import torch

from compress.core.errors import CompressError
from compress.pipeline.recipe import Recipe, RunContext


def test_llama_after_rtn_lists_norms_as_kept(tiny_llama):
    from compress.evals.coverage import block_coverage, coverage_summary

    model = Recipe.from_specs([{"method": "rtn", "bits": 4, "group_size": 32}]).run(tiny_llama, RunContext(progress=False))
    cov = block_coverage(model)
    assert cov["compressed_modules"] == 7 * len(model.model.layers)
    cfg = model.config
    kv = cfg.num_key_value_heads * (cfg.hidden_size // cfg.num_attention_heads)
    per_block = 2 * cfg.hidden_size ** 2 + 2 * cfg.hidden_size * kv + 3 * cfg.hidden_size * cfg.intermediate_size
    assert cov["compressed_params"] == per_block * len(model.model.layers)
    assert set(cov["kept"]) == {"norm"} and len(cov["kept"]["norm"]) == 2 * len(model.model.layers)
    assert coverage_summary(cov).endswith(f"; kept: {2 * len(model.model.layers)} norm")


def test_ignored_linear_is_listed_not_hidden(tiny_llama):
    from compress.evals.coverage import block_coverage

    ctx = RunContext(progress=False, ignore=[r"down_proj"])
    model = Recipe.from_specs([{"method": "rtn", "bits": 4, "group_size": 32}]).run(tiny_llama, ctx)
    kept = block_coverage(model)["kept"]
    assert sorted(kept["linear not compressed"]) == [f"model.layers.{i}.mlp.down_proj.weight"
                                                    for i in range(len(model.model.layers))]


def _tiny_moe(kind):
    from transformers import AutoModelForCausalLM, MixtralConfig, Qwen3MoeConfig

    common = dict(vocab_size=257, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=256, num_experts_per_tok=2, use_cache=False)
    cfg = MixtralConfig(num_local_experts=4, **common) if kind == "mixtral" else \
        Qwen3MoeConfig(num_experts=4, moe_intermediate_size=48, head_dim=16, **common)
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(cfg)


@pytest.mark.parametrize("kind", ["mixtral", "qwen3_moe"])
def test_fused_experts_are_refused_and_listed(kind):
    from compress.evals.coverage import block_coverage, refuse_fused_experts

    model = _tiny_moe(kind)
    kept = block_coverage(model)["kept"]
    assert sorted(n.rsplit(".", 1)[-1] for n in kept["fused experts"]) == ["down_proj"] * 2 + ["gate_up_proj"] * 2
    assert len(kept["router"]) == 2  # the router (gate) of each block: kept in 16 bits
    with pytest.raises(CompressError, match=r"model.layers.0.mlp.experts.gate_up_proj \(and 3 more\) are fused "
                                            r"mixture-of-experts weights, which awq cannot compress; .*\(methods that "
                                            r"compress experts: .*rtn"):
        refuse_fused_experts(model, "awq")
