"""The sequential engine: capture, statistics, propagation, structure tracing, spilling; LLaMA and OPT."""
import pytest
import torch
import torch.nn as nn

from compress.model.arch import find_blocks
from compress.pipeline.engine import Engine
from compress.pipeline.method import Method, Needs


class Recorder(Method):
    """A method that changes nothing and keeps what the engine showed it."""

    name = "recorder"
    family = "quantization"
    layerwise = True
    needs = Needs(calibration=True, stats=("hessian", "input_norms", "input_absmax"))

    def __init__(self, true_sequential=False):
        super().__init__()
        self.true_sequential = true_sequential
        self.seen = {}
        self.groups = []
        self.inputs = []

    def compress_block(self, block):
        self.inputs.append(block.engine.inputs.data.clone())
        groups = block.linear_groups(self.true_sequential)
        self.groups.append(groups)
        for g in groups:
            stats = block.collect(g, self.stats_needed())
            self.seen.update({block.qualified(n): s for n, s in stats.items()})


def _reference_inputs(model, ids):
    """Inputs of every linear from one plain forward pass of the whole model."""
    xs = {}
    hooks = [m.register_forward_hook(lambda m, i, o, n=n: xs.setdefault(n, []).append(i[0].detach()))
             for n, m in model.named_modules() if isinstance(m, nn.Linear) and n != "lm_head"]
    with torch.no_grad():
        out = model(input_ids=ids, output_hidden_states=True)
    for h in hooks:
        h.remove()
    return {n: torch.cat([t.reshape(-1, t.shape[-1]) for t in v]) for n, v in xs.items()}, out.hidden_states


@pytest.mark.parametrize("arch", ["llama", "opt"])
def test_stats_and_propagation_match_full_forward(arch, tiny_calib):
    from compress.model.tiny import tiny_model

    model = tiny_model(arch, seed=0, layers=3)
    ref_x, hidden = _reference_inputs(model, tiny_calib)
    rec = Recorder()
    Engine(model, tiny_calib, batch_size=3, progress=False).run([rec])
    prefix, blocks = find_blocks(model)
    assert len(rec.inputs) == len(blocks)
    for i, inp in enumerate(rec.inputs):  # block i saw exactly the hidden states the full model gives it
        assert torch.allclose(inp, hidden[i], atol=1e-5)
    assert set(rec.seen) == set(ref_x)
    for name, st in rec.seen.items():
        x = ref_x[name].float()
        assert st.ntokens == x.shape[0]
        assert torch.allclose(st.hessian, 2 * x.t() @ x / x.shape[0], atol=1e-4, rtol=1e-4)
        assert torch.allclose(st.input_norms, x.norm(dim=0), atol=1e-4, rtol=1e-4)
        assert torch.allclose(st.absmax, x.abs().amax(dim=0))


def test_traced_structure_llama(tiny_llama, tiny_calib):
    rec = Recorder(true_sequential=True)
    Engine(tiny_llama, tiny_calib, progress=False).run([rec])
    assert rec.groups[0] == [["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"], ["self_attn.o_proj"],
                             ["mlp.gate_proj", "mlp.up_proj"], ["mlp.down_proj"]]


def test_traced_structure_opt(tiny_opt, tiny_calib):
    rec = Recorder(true_sequential=True)
    eng = Engine(tiny_opt, tiny_calib, progress=False)
    eng.run([rec])
    assert rec.groups[0] == [["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"], ["self_attn.out_proj"], ["fc1"], ["fc2"]]


def test_producers_found(tiny_llama, tiny_calib):
    seen = {}
    Engine(tiny_llama, tiny_calib, progress=False).observe(lambda b: seen.setdefault(b.index, b.graph.producers))
    assert seen[0]["self_attn.q_proj"] == "input_layernorm"
    assert seen[0]["mlp.gate_proj"] == "post_attention_layernorm"
    assert seen[0]["self_attn.o_proj"] is None


def test_spill_to_disk_gives_identical_results(tiny_llama, tiny_calib, tmp_path):
    a, b = Recorder(), Recorder()
    Engine(tiny_llama, tiny_calib, progress=False, spill="never").run([a])
    eng = Engine(tiny_llama, tiny_calib, progress=False, spill="always", spill_dir=str(tmp_path))
    eng.run([b])
    for k in a.seen:
        assert torch.equal(a.seen[k].hessian, b.seen[k].hessian)
    assert not list(tmp_path.glob("activations-*"))  # memory-mapped files are removed afterwards


def test_batch_size_does_not_change_statistics(tiny_llama, tiny_calib):
    a, b = Recorder(), Recorder()
    Engine(tiny_llama, tiny_calib, batch_size=1, progress=False).run([a])
    Engine(tiny_llama, tiny_calib, batch_size=5, progress=False).run([b])
    for k in a.seen:
        assert torch.allclose(a.seen[k].hessian, b.seen[k].hessian, atol=1e-5)
