"""GPTQ: lower layer reconstruction error than RTN on the same grid, codes on the grid, act-order reload."""
import pytest
import torch
import torch.nn as nn

from compress.kernels.hessian import inverse_cholesky
from compress.kernels.obs import gptq_quantize
from compress.kernels.quant_grid import QuantSpec, rtn_quantize
from compress.layers.quant_linear import QuantLinear
from compress.pipeline.recipe import Recipe, RunContext


class _Inputs(nn.Module):
    pass


def _layer_inputs(model, ids):
    """Inputs of every block linear of the *original* model (per-layer reconstruction targets)."""
    xs = {}
    hooks = [m.register_forward_hook(lambda m, i, o, n=n: xs.setdefault(n, []).append(i[0].detach().reshape(-1, i[0].shape[-1])))
             for n, m in model.named_modules() if isinstance(m, nn.Linear) and "layers" in n]
    with torch.no_grad():
        model(input_ids=ids)
    for h in hooks:
        h.remove()
    return {k: torch.cat(v) for k, v in xs.items()}


@pytest.mark.parametrize("spec", [QuantSpec(3, 32, False), QuantSpec(4, -1, True), QuantSpec(2, 16, False)])
def test_gptq_beats_rtn_on_every_linear(spec):
    """For every linear, ||WX - W_hat X||^2 of GPTQ <= RTN's on the same grid and the same calibration inputs."""
    from compress.model.tiny import tiny_model

    torch.manual_seed(0)
    model = tiny_model("llama", seed=0, hidden=64, intermediate=128, layers=2)
    ids = torch.randint(0, 256, (16, 64))
    xs = _layer_inputs(model, ids)
    for name, x in xs.items():
        w = model.get_submodule(name).weight.detach()
        H = 2 * x.t() @ x / x.shape[0]
        g, _ = gptq_quantize(w, H, spec)
        r = rtn_quantize(w, spec)
        err_g = ((x @ (w - g.dequantize()).t()) ** 2).sum()
        err_r = ((x @ (w - r.dequantize()).t()) ** 2).sum()
        assert err_g <= err_r * 1.0001, name


@pytest.mark.parametrize("act_order,static", [(False, False), (True, False), (True, True)])
def test_codes_lie_on_stored_grid_and_reload(act_order, static, tmp_path, tiny_tok):
    from compress.formats import load_checkpoint, save_checkpoint
    from compress.model.tiny import tiny_model

    model = tiny_model("llama", seed=1, hidden=96, layers=2)
    ids = torch.randint(0, 256, (8, 48))
    from compress.sources.data import Calibration, TextSource

    calib = Calibration(ids, TextSource("test", "random", "-", "-"), 0)
    model = Recipe.from_specs([{"method": "gptq", "bits": 3, "group_size": 32, "act_order": act_order, "static_groups": static}]).run(
        model, RunContext(calibration=calib, progress=False))
    qls = [m for m in model.modules() if isinstance(m, QuantLinear)]
    assert len(qls) == 14
    for m in qls:
        qw = m.quantized_weight()
        assert int(qw.codes.max()) <= 7
        w = m.dequantize_weight(torch.float32)
        gi = qw.g_idx.long()
        k = w / qw.scales.float()[:, gi] + qw.zeros.float()[:, gi]
        assert torch.allclose(k, k.round(), atol=1e-3)  # exactly on the grid its scales/zeros define
        # act-order without static groups needs the group index; natural order does not store one
        assert (m.weight_g_idx is not None) == (act_order and not static)
    with torch.no_grad():
        ref = model(input_ids=ids[:2]).logits
    out = save_checkpoint(model, tiny_tok, tmp_path / "ckpt")
    loaded, _, _ = load_checkpoint(out)
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=ids[:2]).logits, ref)


def test_dead_columns_and_singular_hessian():
    torch.manual_seed(0)
    x = torch.randn(64, 32)
    x[:, 5] = 0  # an input channel never active: zero Hessian diagonal
    x[:, 7] = x[:, 6]  # two identical channels: singular Hessian
    H = 2 * x.t() @ x / 64
    w = torch.randn(16, 32)
    qw, info = gptq_quantize(w, H, QuantSpec(4, 16, False), percdamp=0.0)
    assert info.dead_columns == 1
    assert torch.isfinite(qw.dequantize()).all()
    assert torch.all(qw.dequantize()[:, 5] == 0)


def test_not_positive_definite_retries_with_more_damping(caplog):
    H = -torch.eye(8)  # hopeless at 1% dampening, fine once dampening outweighs it? no: mean diag < 0
    with pytest.raises(ValueError):
        inverse_cholesky(H, 0.01)
    A = torch.randn(8, 3)
    H = A @ A.t()  # rank 3, positive semi-definite
    H[0, 1] = H[1, 0] = H[0, 1] + 5.0  # now indefinite
    inv = inverse_cholesky(H, 0.01)
    assert inv.percdamp > 0.01 and torch.isfinite(inv.upper).all()


def test_inverse_cholesky_in_place_equals_the_textbook_steps():
    """The one-buffer inverse Cholesky gives the bits of chol(chol_inverse(chol(H + damp I))), upper, each a new tensor."""
    X = torch.randn(300, 96, generator=torch.Generator().manual_seed(1))
    H = 2 * X.t() @ X / 300
    before = H.clone()
    damp = 0.01 * torch.diag(H).mean().item()
    L = torch.linalg.cholesky(H + damp * torch.eye(96))
    U = torch.linalg.cholesky(torch.cholesky_inverse(L), upper=True)
    got = inverse_cholesky(H, 0.01)
    assert torch.equal(got.upper, U) and got.percdamp == 0.01
    assert torch.equal(H, before)  # the caller's H is left as it was


def test_sweep_frees_a_last_use_hessian_before_its_column_loop():
    """A HessianSource marked last_use hands its tensor to the sweep, which drops it once the inverse exists: during
    the column loop only the inverse factor is alive (one [in, in] matrix, not two); the codes are the same bits as
    with the tensor passed directly, and a shared source not marked last_use keeps its Hessian."""
    import weakref
    from unittest import mock

    import compress.kernels.obs as obs
    from compress.pipeline.engine import LinearStats

    torch.manual_seed(0)
    W, X = torch.randn(16, 64), torch.randn(200, 64)
    H = 2 * X.t() @ X / 200
    spec = QuantSpec(bits=4, group_size=16)
    want, _ = gptq_quantize(W, H.clone(), spec)

    stats = LinearStats(200, H.clone())
    ref = weakref.ref(stats.hessian)
    alive_in_loop = []
    real = obs.find_params
    with mock.patch.object(obs, "find_params", lambda *a, **k: (alive_in_loop.append(ref() is not None), real(*a, **k))[1]):
        shared, _ = gptq_quantize(W, stats, spec)  # not last_use: kept for the next reader
        assert stats.hessian is not None and all(alive_in_loop)
        alive_in_loop.clear()
        stats.last_use = True
        got, _ = gptq_quantize(W, stats, spec)
    assert stats.hessian is None and alive_in_loop and not any(alive_in_loop)
    assert torch.equal(got.codes, want.codes) and torch.equal(shared.codes, want.codes)
    with pytest.raises(ValueError, match="already handed"):
        gptq_quantize(W, stats, spec)


def test_block_marks_only_the_last_reader_of_shared_stats():
    """q, k and v read one Hessian: GPTQ takes it at v (the last of its group), gate/up at up; the model that comes
    out is the same, tensor for tensor, as a run in which no sweep ever takes a Hessian."""
    from unittest import mock

    from compress.model.tiny import tiny_model
    from compress.pipeline.engine import Engine
    from compress.pipeline.method import METHODS

    gptq_cls = METHODS.get("gptq")
    seen = []

    class Spy(gptq_cls):
        def compress_linear(self, name, linear, stats):
            seen.append((name.rsplit(".", 1)[-1], stats.last_use))
            return super().compress_linear(name, linear, stats)

    def run(method_cls):
        torch.manual_seed(0)
        model = tiny_model("llama", layers=1, hidden=64, intermediate=128, heads=4)
        ids = torch.randint(0, 256, (4, 32))
        Engine(model, ids, batch_size=4, progress=False).run([method_cls(gptq_cls.Config(bits=4, group_size=32, true_sequential=True))])
        return model.state_dict()

    got = run(Spy)
    flags = dict(seen)
    assert (flags["q_proj"], flags["k_proj"], flags["v_proj"]) == (False, False, True)
    assert (flags["gate_proj"], flags["up_proj"], flags["o_proj"], flags["down_proj"]) == (False, True, True, True)
    with mock.patch("compress.kernels.obs.take_hessian", lambda s: s if isinstance(s, torch.Tensor) else s.hessian):
        kept = run(gptq_cls)
    assert got.keys() == kept.keys() and all(torch.equal(got[k], kept[k]) for k in got)
