"""The shared training loop: learns, trains only what it is given, schedules, resumes on the same loss curve."""
import pytest
import torch

from compress.core.errors import ConfigError
from compress.train.trainer import TrainConfig, Trainer


def _cfg(tmp_path=None, **kw):
    base = dict(steps=12, lr=3e-3, warmup=0.1, train_batch_size=4, autocast="float32")
    base.update(kw)
    if tmp_path is not None:
        base["resume"] = str(tmp_path)
    return TrainConfig(**base)


def _data():
    g = torch.Generator().manual_seed(0)
    return torch.randint(0, 256, (16, 24), generator=g)


def test_loss_goes_down_and_only_given_params_change():
    from compress.model.tiny import tiny_model

    model = tiny_model("llama", seed=0)
    for p in model.parameters():
        p.requires_grad_(False)
    train = [model.model.layers[0].mlp.down_proj.weight, model.model.layers[1].self_attn.o_proj.weight]
    for p in train:
        p.requires_grad_(True)
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    res = Trainer(model, _data(), _cfg(steps=30), progress=False).train()
    assert len(res.losses) == 30 and res.trainable_params == sum(p.numel() for p in train)
    assert sum(res.losses[-5:]) < sum(res.losses[:5])
    for n, p in model.named_parameters():
        if n in frozen:
            assert torch.equal(p, frozen[n]), n


def test_resume_continues_the_same_loss_curve(tmp_path):
    from compress.model.tiny import tiny_model

    full = Trainer(tiny_model("llama", seed=0), _data(), _cfg(grad_accum=2), progress=False).train()
    first = Trainer(tiny_model("llama", seed=0), _data(), _cfg(tmp_path, grad_accum=2, save_every=5), progress=False)
    first.train(stop_after=7)  # "crash" after step 7; the last saved state is step 5
    resumed = Trainer(tiny_model("llama", seed=0), _data(), _cfg(tmp_path, grad_accum=2, save_every=5), progress=False).train()
    assert resumed.steps == 12
    assert resumed.losses == pytest.approx(full.losses, rel=1e-5, abs=1e-6)


def test_schedule_warmup_then_cosine():
    cfg = TrainConfig(steps=100, warmup=0.1)
    lrs = [cfg.schedule(s) for s in range(100)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:]))
    assert lrs[-1] < 0.01


def test_bad_config_and_nothing_to_train():
    with pytest.raises(ConfigError, match="--steps 0 is out of range"):
        TrainConfig(steps=0).validate()
    from compress.model.tiny import tiny_model

    model = tiny_model("llama")
    for p in model.parameters():
        p.requires_grad_(False)
    with pytest.raises(ConfigError, match="nothing to train"):
        Trainer(model, _data(), _cfg(), progress=False)


def test_kd_kl_matches_hand_computation():
    from compress.kernels.losses import kd_kl

    s = torch.tensor([[[1.0, 0.0, -1.0], [0.5, 0.5, 0.0]]])
    t = torch.tensor([[[0.0, 1.0, 0.0], [2.0, 0.0, 0.0]]])
    T = 2.0
    total = 0.0
    for i in range(2):
        ps = torch.softmax(s[0, i] / T, -1)
        pt = torch.softmax(t[0, i] / T, -1)
        total += float((pt * (pt.log() - ps.log())).sum())
    assert kd_kl(s, t, T).item() == pytest.approx(total / 2 * T * T, rel=1e-6)
    assert kd_kl(t, t, T).item() == pytest.approx(0.0, abs=1e-7)


def test_lora_wraps_and_merges():
    from compress.model.tiny import tiny_model
    from compress.train.lora import LoraOptions, add_lora, merge_lora

    model = tiny_model("llama", seed=0)
    ids = torch.randint(0, 256, (2, 12))
    with torch.no_grad():
        ref = model(input_ids=ids).logits
    peft_model = add_lora(model, LoraOptions(lora_r=4))
    trainable = [n for n, p in peft_model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    with torch.no_grad():  # B starts at zero: the adapted model is the original one
        assert torch.allclose(peft_model(input_ids=ids).logits, ref, atol=1e-6)
    Trainer(peft_model, _data(), _cfg(steps=3), progress=False).train()
    with torch.no_grad():
        adapted = peft_model(input_ids=ids).logits
    merged = merge_lora(peft_model)
    assert not any("lora_" in n for n, _ in merged.named_parameters())
    with torch.no_grad():
        assert torch.allclose(merged(input_ids=ids).logits, adapted, atol=1e-4)
