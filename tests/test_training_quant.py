"""Training-aware quantization (QAT, PEQA, LLM-QAT) on tiny random models: the straight-through estimator, LSQ's
gradient, PEQA's scale-only optimizer, fake-quant == exported integers, reload, resume, data-free LLM-QAT, CLI."""
import math

import pytest
import torch

from compress.core.errors import ConfigError
from compress.kernels.fake_quant import GroupLayout, _FakeQuant, ste_fake_quantize
from compress.kernels.quant_grid import QuantizedWeight, QuantSpec, rtn_quantize
from compress.layers.fake_quant_linear import FakeQuantLinear
from compress.layers.kernels import select_kernels
from compress.layers.quant_linear import QuantLinear
from compress.pipeline.recipe import Recipe, RunContext
from compress.train.fake_quant import export_quantized, fake_quantize_model

TRAIN = dict(steps=6, lr=1e-3, train_samples=16, train_seqlen=32, train_batch_size=4, autocast="float32")


def _run(model, method, ctx=None, **opts):
    ctx = ctx or RunContext(progress=False, calibration=None)
    recipe = Recipe.from_specs([{"method": method, **opts}])
    return recipe.run(model, ctx), recipe.stages[0]


def _ctx(calib=None, **kw):
    from compress.sources.data import Calibration, TextSource

    if calib is None:
        calib = torch.randint(0, 256, (24, 32), generator=torch.Generator().manual_seed(5))
    return RunContext(progress=False, calibration=Calibration(calib, TextSource("file:x", "test", "all", "x"), 0), **kw)


@pytest.fixture()
def calib_data(monkeypatch):
    """training_data() draws from the calibration source: serve random token windows instead of a text file."""
    import compress.train.trainer as trainer

    def fake(ctx, model, config, source=None):
        g = torch.Generator().manual_seed(ctx.seed + 1)
        return torch.randint(0, 256, (config.train_samples, config.train_seqlen), generator=g)

    import compress.train.fake_quant as fake_quant

    monkeypatch.setattr(trainer, "training_data", fake)
    monkeypatch.setattr(fake_quant, "training_data", fake)  # bound there at import


def _one_row(w, bits=3, sym=True, scale=0.5):
    """A FakeQuantLinear of one output row, per-channel grid with the given scale (symmetric: zero 2^(bits-1))."""
    spec = QuantSpec(bits, -1, sym)
    n = w.numel()
    zero = (spec.maxq + 1) // 2 if sym else 0
    qw = QuantizedWeight(torch.zeros(1, n, dtype=torch.uint8), torch.full((1, 1), scale, dtype=torch.float16),
                         torch.full((1, 1), zero, dtype=torch.uint8), spec.g_idx(n), spec)
    return qw


def test_ste_gradient_is_identity_inside_the_range_and_zero_outside():
    w = torch.tensor([[0.3, -0.8, 1.2, 10.0, -10.0, 1.9]])  # /0.5 + 4 -> 4.6, 2.4, 6.4, 24 (above), -16 (below), 7.8 (above 7)
    fq = FakeQuantLinear(_one_row(w), latent=w, scale_mode="fixed")
    upstream = torch.tensor([[1.0, 2.0, 3.0, 4.0, 5.0, 6.0]])
    (fq.fake_weight() * upstream).sum().backward()
    assert torch.equal(fq.weight.grad, torch.tensor([[1.0, 2.0, 3.0, 0.0, 0.0, 0.0]]))
    with torch.no_grad():  # the forward pass is the real quantizer: codes 5, 2, 6, 7 (clipped), 0 (clipped), 7
        assert torch.equal(fq.fake_weight(), 0.5 * (torch.tensor([[5.0, 2.0, 6.0, 7.0, 0.0, 7.0]]) - 4))


def test_lsq_gradient_matches_the_papers_formula_on_a_hand_case():
    # LSQ (arXiv 1902.08153) eq. 3 for v/s = [0.6, -1.6, 20, -20], Q_N = 4, Q_P = 3 (3-bit symmetric, zero 4):
    # -v/s + round(v/s) inside, Q_P above, -Q_N below; gradient scale g = 1/sqrt(N_W * Q_P) (Sec. 2.2), N_W = 4.
    w = torch.tensor([[0.3, -0.8, 10.0, -10.0]])
    fq = FakeQuantLinear(_one_row(w), latent=w, scale_mode="lsq")
    c = torch.tensor([[1.0, 2.0, 3.0, 4.0]])
    (fq.fake_weight() * c).sum().backward()
    per_weight = [-0.6 + 1.0, 1.6 - 2.0, 3.0, -4.0]
    expected = sum(ci * d for ci, d in zip(c[0].tolist(), per_weight)) / math.sqrt(4 * 3)
    assert fq.weight_scale.grad.item() == pytest.approx(expected, rel=1e-5)
    assert torch.equal(fq.weight.grad, torch.tensor([[1.0, 2.0, 0.0, 0.0]]))


@pytest.mark.parametrize("in_f,gs,natural", [(100, 32, True), (64, -1, True), (96, 32, False), (40, 128, True)])
def test_fused_fake_quant_equals_the_composed_ste_expression(in_f, gs, natural):
    torch.manual_seed(0)
    spec = QuantSpec(3, gs)
    G = spec.groups(in_f)
    gi = spec.g_idx(in_f)
    if not natural:
        gi = gi[torch.randperm(in_f)]
    w = (torch.randn(6, in_f) * 0.05).requires_grad_(True)
    s = (torch.rand(6, G) * 0.01 + 0.005).requires_grad_(True)
    z = torch.randint(0, 8, (6, G)).float()
    a = _FakeQuant.apply(w, s, z, GroupLayout(gi, G, gs, natural), 7)
    g = torch.randn_like(a)
    gw, gs_ = torch.autograd.grad(a, [w, s], g)
    w2, s2 = w.detach().clone().requires_grad_(True), s.detach().clone().requires_grad_(True)
    b = ste_fake_quantize(w2, s2[:, gi.long()], z[:, gi.long()], 7)
    gw2, gs2 = torch.autograd.grad(b, [w2, s2], g)
    assert torch.equal(a, b)
    assert torch.allclose(gw, gw2, rtol=1e-6, atol=0)  # the composed form's s * (1/s) is 1 up to rounding
    assert torch.allclose(gs_, gs2, atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize("mode", ["lsq", "fixed", "minmax", "peqa"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fake_quant_forward_equals_the_exported_quantlinear(mode, dtype):
    torch.manual_seed(1)
    w = torch.randn(48, 80) * 0.05
    qw = rtn_quantize(w, QuantSpec(3, 32))
    peqa = mode == "peqa"
    fq = FakeQuantLinear(qw, latent=None if peqa else w, scale_mode="fixed" if peqa else mode, learn_scale=peqa,
                         bias=torch.randn(48), dtype=dtype)
    with torch.no_grad():  # move away from the initial grid as training would
        if fq.weight is not None:
            fq.weight.add_(torch.randn_like(fq.weight) * 0.01)
        fq.weight_scale.mul_(1 + 0.1 * torch.rand_like(fq.weight_scale))
    x = torch.randn(5, 80, dtype=dtype)
    ql = fq.to_quant_linear()
    assert isinstance(ql, QuantLinear)
    with torch.no_grad():
        assert torch.equal(fq(x), ql(x))
    if peqa:  # PEQA exports the initial integer codes with new scales
        assert torch.equal(ql.quantized_weight().codes, qw.codes)
        assert not torch.equal(ql.weight_scale, qw.scales)


def test_model_fake_quant_equals_export_and_checkpoint_reloads(tiny_llama, tiny_tok, tmp_path, calib_data):
    from compress.formats import load_checkpoint, save_checkpoint

    model, method = _run(tiny_llama, "qat", _ctx(), bits=3, group_size=32, **TRAIN)
    assert not any(isinstance(m, FakeQuantLinear) for m in model.modules())
    assert sum(isinstance(m, QuantLinear) for m in model.modules()) == 14
    ids = torch.randint(0, 256, (2, 24))
    with torch.no_grad():
        ref = model(input_ids=ids).logits
    out = save_checkpoint(model, tiny_tok, tmp_path / "qat")
    loaded, _, _ = load_checkpoint(out)
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=ids).logits, ref)
    # the last held-out loss the trainer measured on fake-quantized weights is the exported model's loss
    from compress.kernels.losses import lm_loss
    from compress.train.fake_quant import heldout_split
    from compress.train.trainer import heldout_loss, training_data

    held = heldout_split(training_data(_ctx(), None, method.config))[1]
    assert held.shape[0] == 2
    assert heldout_loss(model, held, 4, lm_loss) == pytest.approx(method.report["heldout_loss_final"], abs=1e-4)


def test_model_level_fake_quant_then_export_keeps_logits(tiny_llama):
    mods = fake_quantize_model(tiny_llama, RunContext(progress=False), QuantSpec(2, 16), scale_mode="lsq")
    with torch.no_grad():
        for fq in mods.values():
            fq.weight.add_(torch.randn_like(fq.weight) * 0.02)
            fq.weight_scale.mul_(1.05)
    ids = torch.randint(0, 256, (2, 20))
    with torch.no_grad():
        before = tiny_llama(input_ids=ids).logits
        assert export_quantized(tiny_llama) == 14
        assert torch.equal(tiny_llama(input_ids=ids).logits, before)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rtn_init_starts_exactly_at_the_rtn_model(tiny_llama, dtype):
    import copy

    model = tiny_llama.to(dtype)
    rtn, _ = _run(copy.deepcopy(model), "rtn", bits=3, group_size=32)
    mods = fake_quantize_model(model, RunContext(progress=False), QuantSpec(3, 32), init="rtn", scale_mode="lsq")
    for name, fq in mods.items():  # latent weights are the originals (bf16 ones hit exact rounding ties: same codes)
        assert torch.equal(fq.to_quantized().codes, rtn.get_submodule(name).quantized_weight().codes)
    ids = torch.randint(0, 256, (2, 20))
    # bit-exact against the RTN model's de-quantized float matmul (its int4 kernel agrees to bf16 rounding only;
    # tests/test_weight_only_kernels.py checks that)
    select_kernels(rtn, enable=False, quiet=True)
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, rtn(input_ids=ids).logits)


def test_qat_lowers_the_loss_and_trains_weights_and_scales(tiny_llama, calib_data):
    model, m = _run(tiny_llama, "qat", _ctx(), bits=3, group_size=32, **{**TRAIN, "steps": 20})
    r = m.report
    assert r["trained_tensors"] == ["weight", "weight_scale"] and r["init"] == "rtn"
    assert r["training"]["steps"] == 20 and r["training"]["loss_last"] < r["training"]["loss_first"]
    assert r["training"]["trainable_params"] == r["scales"] + sum(q.in_features * q.out_features for q in model.modules() if isinstance(q, QuantLinear))


def test_peqa_optimizer_holds_only_the_scales(tiny_llama, calib_data, monkeypatch):
    import compress.train.fake_quant as fqmod

    seen = {}

    class Spy(fqmod.Trainer):
        def __init__(self, model, *a, **k):
            super().__init__(model, *a, **k)
            scales = {id(m.weight_scale): m.weight_scale.numel() for m in model.modules() if isinstance(m, FakeQuantLinear)}
            held = [p for g in self.optimizer.param_groups for p in g["params"]]
            seen.update(n_scales=sum(scales.values()), all_scales=all(id(p) in scales for p in held),
                        held=sum(p.numel() for p in held), n_tensors=len(held), n_modules=len(scales),
                        grad=[n for n, p in model.named_parameters() if p.requires_grad])

    monkeypatch.setattr(fqmod, "Trainer", Spy)
    codes_before = {n: rtn_quantize(m.weight, QuantSpec(3, 32)).codes for n, m in tiny_llama.named_modules()
                    if isinstance(m, torch.nn.Linear) and ".layers." in n}
    model, m = _run(tiny_llama, "peqa", _ctx(), bits=3, group_size=32, **{**TRAIN, "steps": 20})
    assert seen["all_scales"] and seen["held"] == seen["n_scales"] and seen["n_tensors"] == seen["n_modules"] == 14
    assert all(n.endswith("weight_scale") for n in seen["grad"])
    r = m.report
    assert r["trained_tensors"] == ["weight_scale"] and r["training"]["trainable_params"] == r["scales"] == seen["n_scales"]
    assert r["training"]["loss_last"] < r["training"]["loss_first"]
    for n, q in model.named_modules():  # the integer codes are exactly the initial quantizer's
        if isinstance(q, QuantLinear):
            assert torch.equal(q.quantized_weight().codes, codes_before[n])


def test_qat_resumes_on_the_same_loss_curve(tmp_path, calib_data, monkeypatch):
    from compress.model.tiny import tiny_model
    from compress.train.trainer import Trainer

    opts = dict(bits=3, group_size=32, **{**TRAIN, "steps": 10})
    _, full = _run(tiny_model("llama", seed=0), "qat", _ctx(), **opts)
    real_train = Trainer.train
    monkeypatch.setattr(Trainer, "train", lambda self, stop_after=None: real_train(self, stop_after=7))  # "crash"
    _, first = _run(tiny_model("llama", seed=0), "qat", _ctx(), resume=str(tmp_path), save_every=4, **opts)
    assert first.report["training"]["steps"] == 7
    monkeypatch.setattr(Trainer, "train", real_train)
    _, resumed = _run(tiny_model("llama", seed=0), "qat", _ctx(), resume=str(tmp_path), save_every=4, **opts)
    assert resumed.report["training"]["steps"] == 10 and len(resumed.report["loss_curve"]) == 10
    assert resumed.report["loss_curve"][:4] == first.report["loss_curve"][:4]  # steps 1-4 restored from the saved state
    assert resumed.report["loss_curve"] == pytest.approx(full.report["loss_curve"], rel=1e-5)
    assert resumed.report["heldout_loss_final"] == pytest.approx(full.report["heldout_loss_final"], rel=1e-5)


def _peaked_tiny_model():
    """A tiny random llama whose next-token distributions are peaked (a random one's are nearly uniform, which
    leaves a distillation loss of ~1e-3 with nothing to learn)."""
    from compress.model.tiny import tiny_model

    model = tiny_model("llama", seed=0)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n.endswith("proj.weight"):
                p.mul_(30 ** 0.5)
        model.model.embed_tokens.weight.mul_(30)
    return model


@pytest.mark.parametrize("init", ["rtn", "gptq"])
def test_llm_qat_is_data_free_and_distills(init, tiny_tok, tmp_path, monkeypatch):
    import compress.sources.data as data

    monkeypatch.setenv("COMPRESS_CACHE_DIR", str(tmp_path))

    def no_data(*a, **k):
        raise AssertionError("LLM-QAT read a dataset")

    monkeypatch.setattr(data, "calib_text", no_data)
    monkeypatch.setattr(data, "eval_text", no_data)
    ctx = RunContext(progress=False, tokenizer=tiny_tok)
    model, m = _run(_peaked_tiny_model(), "llm-qat", ctx, bits=2, group_size=32, quant_init=init, **{**TRAIN, "steps": 20})
    r = m.report
    assert r["train_data"]["source"] == "generated" and r["init"] == init and r["scale_mode"] == "minmax"
    assert r["training"]["loss_last"] < r["training"]["loss_first"]  # KL to the full-precision teacher goes down
    assert r["heldout_loss_final"] < 0.8 * r["heldout_loss_init"]  # on generated sequences it did not train on
    assert sum(isinstance(q, QuantLinear) for q in model.modules()) == 14


def test_bad_options_are_one_clear_error():
    from compress.pipeline.method import build_method

    with pytest.raises(ConfigError, match=r"--scale-mode 'sgd' is not allowed; choose one of: fixed, lsq, minmax"):
        build_method("qat", {"scale_mode": "sgd"})
    with pytest.raises(ConfigError, match=r"--quant-init 'awq' is not allowed; choose one of: rtn, gptq"):
        build_method("peqa", {"quant_init": "awq"})
    with pytest.raises(ConfigError, match=r"method 'peqa' has no option --scale-mode"):
        build_method("peqa", {"scale_mode": "lsq"})
    with pytest.raises(ConfigError, match=r"--bits 1 is out of range"):
        build_method("llm-qat", {"bits": 1})


def test_cli_finetune_qat_then_eval_same_perplexity(tiny_model_dir, tmp_path):
    from click.testing import CliRunner

    from compress.cli import main
    from compress.runs.results import read_records

    quick = ["--calib", "pydoc", "--nsamples", "4", "--seqlen", "64", "--eval", "pydoc", "--eval-seqlen", "128",
             "--eval-windows", "4", "--no-progress"]
    out = tmp_path / "ckpt"
    res = CliRunner().invoke(main, ["finetune", "--method", "qat", "--bits", "3", "--group-size", "32", "--steps", "4",
                                    "--train-samples", "8", "--train-seqlen", "64", "--autocast", "float32",
                                    "--model", str(tiny_model_dir), "--output", str(out), *quick], catch_exceptions=False)
    assert res.exit_code == 0, res.output
    rec = read_records()[-1]
    assert rec["method"] == "qat" and rec["family"] == "training-aware" and rec["kind"] == "finetune"
    t = rec["details"]["qat"]["training"]
    assert t["steps"] == 4 and t["trainable_params"] > 0 and t["loss_first"] is not None and t["seconds"] >= 0
    assert rec["details"]["qat"]["train_data"]["source"] == "pydoc"
    assert 3.0 < rec["size"]["bits_per_weight"] < 4.0
    ppl = rec["metrics"]["after"]["ppl_pydoc"]["value"]
    res = CliRunner().invoke(main, ["eval", "--model", str(out), "--eval", "pydoc", "--eval-seqlen", "128",
                                    "--eval-windows", "4", "--no-progress"], catch_exceptions=False)
    assert res.exit_code == 0, res.output
    assert read_records()[-1]["metrics"]["after"]["ppl_pydoc"]["value"] == pytest.approx(ppl, rel=1e-4)
    res = CliRunner().invoke(main, ["finetune", "--method", "peqa", "--scale-mode", "lsq", "--model", str(tiny_model_dir), *quick])
    assert res.exit_code == 2 and "has no option --scale-mode" in res.output
