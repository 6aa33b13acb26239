"""Knowledge distillation and recovery stages: the mixed loss by hand, layer-dropped students that load with
AutoModelForCausalLM, the teacher of a recipe is the model the run started from, recovery keeps a pruned model's
sparsity, the CLI verb end to end."""
import copy
import json
import math

import pytest
import torch
import torch.nn.functional as F

from compress.core.errors import ConfigError
from compress.pipeline.method import Method, Needs


def test_mixed_distillation_loss_matches_hand_computation():
    from compress.model.tiny import tiny_model
    from compress.train.trainer import distillation_loss

    teacher, student = tiny_model("llama", seed=1), tiny_model("llama", seed=2)
    ids = torch.randint(0, 256, (2, 6), generator=torch.Generator().manual_seed(0))
    labels = ids.clone()
    labels[0, :3] = -100  # a masked prompt
    T, w, h = 2.0, 0.3, 0.5
    got = distillation_loss(teacher, temperature=T, kd_weight=w, hidden_weight=h)(student, {"input_ids": ids, "labels": labels})
    with torch.no_grad():
        to = teacher(input_ids=ids, output_hidden_states=True)
        so = student(input_ids=ids, output_hidden_states=True)
    kl, ce, n = 0.0, 0.0, 0
    for b in range(2):
        for t in range(5):  # position t predicts token t + 1
            if labels[b, t + 1] == -100:
                continue
            pt = torch.softmax(to.logits[b, t] / T, -1)
            ps = torch.softmax(so.logits[b, t] / T, -1)
            kl += float((pt * (pt.log() - ps.log())).sum())
            ce += -float(torch.log_softmax(so.logits[b, t], -1)[labels[b, t + 1]])
            n += 1
    mse = float(((so.hidden_states[-1] - to.hidden_states[-1]) ** 2).mean())
    hand = w * T * T * kl / n + (1 - w) * ce / n + h * mse
    assert got.item() == pytest.approx(hand, rel=1e-5)
    # kd_weight 1: pure KD; a student equal to its teacher has zero KD loss
    pure = distillation_loss(teacher, temperature=T, kd_weight=1.0)
    assert pure(copy.deepcopy(teacher), {"input_ids": ids}).item() == pytest.approx(0.0, abs=1e-6)


def test_layer_choice_uniform_and_block_influence():
    from compress.model.tiny import tiny_model
    from compress.train.layer_drop import block_influence, importance_keep, uniform_keep

    assert uniform_keep(30, 15) == [0, 2, 4, 6, 8, 10, 12, 14, 17, 19, 21, 23, 25, 27, 29]
    assert uniform_keep(4, 4) == [0, 1, 2, 3] and uniform_keep(5, 2) == [0, 4]
    with pytest.raises(ConfigError, match="--student-layers 31 is out of range for a model of 30 blocks"):
        uniform_keep(30, 31)
    model = tiny_model("llama", seed=0, layers=4)
    ids = torch.randint(0, 256, (3, 16), generator=torch.Generator().manual_seed(0))
    scores = block_influence(model, ids, batch_size=2)
    # by hand for block 2: 1 - mean cosine(input, output) over all tokens
    with torch.no_grad():
        hs = model(input_ids=ids, output_hidden_states=True).hidden_states  # [emb, after block 0, 1, 2, norm(3)]
    hand = 1 - F.cosine_similarity(hs[2].float(), hs[3].float(), dim=-1).mean().item()
    assert scores[2] == pytest.approx(hand, rel=1e-4)
    assert importance_keep(scores, 2) == sorted(sorted(range(4), key=lambda i: -scores[i])[:2])


def test_layer_dropped_student_has_the_blocks_and_loads_with_automodel(tiny_tok, tmp_path):
    from transformers import AutoModelForCausalLM

    from compress.formats import save_checkpoint
    from compress.model.tiny import tiny_model
    from compress.train.layer_drop import drop_blocks

    model = tiny_model("llama", seed=0, layers=4)
    originals = [model.model.layers[i] for i in (0, 2, 3)]
    drop_blocks(model, [0, 2, 3])
    assert list(model.model.layers) == originals and model.config.num_hidden_layers == 3
    assert [b.self_attn.layer_idx for b in model.model.layers] == [0, 1, 2]
    ids = torch.randint(0, 256, (1, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = model(input_ids=ids).logits
    out = save_checkpoint(model, tiny_tok, tmp_path / "student")
    assert json.loads((out / "config.json").read_text())["num_hidden_layers"] == 3
    loaded = AutoModelForCausalLM.from_pretrained(str(out))
    assert len(loaded.model.layers) == 3
    with torch.no_grad():
        assert torch.allclose(loaded(input_ids=ids).logits, ref, atol=1e-5)
    gen = loaded.generate(ids, max_new_tokens=4, do_sample=False, use_cache=True, pad_token_id=256)
    assert gen.shape == (1, 16)  # the renumbered KV cache works


class _TinyMagnitude(Method):
    """A test-only pruning stage: zero the smaller half of every block linear's weights, per output row."""

    name, family = "test-magnitude", "pruning"
    needs = Needs()

    def apply(self, model, ctx):
        with torch.no_grad():
            for block in model.model.layers:
                for mod in block.modules():
                    if type(mod) is torch.nn.Linear:
                        w = mod.weight
                        k = w.shape[1] // 2
                        idx = w.abs().argsort(dim=1)[:, :k]
                        w.scatter_(1, idx, 0.0)
        return model


def _ctx(tok):
    from compress.pipeline.recipe import RunContext
    from compress.sources.data import get_calibration

    return RunContext(tokenizer=tok, calibration=get_calibration("pydoc", tok, nsamples=4, seqlen=64), progress=False)


def test_kd_recovery_learns_from_the_start_model_and_keeps_sparsity(tiny_tok):
    from compress.model.tiny import tiny_model
    from compress.pipeline.method import build_method
    from compress.pipeline.recipe import Recipe
    from compress.train.finetune import sparsity, zero_masks
    from compress.train.trainer import heldout_loss

    start = tiny_model("llama", seed=0)
    original = copy.deepcopy(start)
    # float32 compute: a random tiny teacher's distributions are nearly flat, bfloat16 rounding would drown the KL
    distill = build_method("distill", {"steps": 30, "train_samples": 16, "train_seqlen": 64, "lr": 1e-3, "kd_weight": 1.0,
                                       "warmup": 0.0, "autocast": "float32"})
    ctx = _ctx(tiny_tok)
    recipe = Recipe([_TinyMagnitude(), distill])
    ids = {"input_ids": ctx.calibration.input_ids}
    pruned_only = _TinyMagnitude().apply(copy.deepcopy(start), ctx)
    model = recipe.run(start, ctx)
    # the teacher kept by the recipe is the model the run started from, unpruned and frozen
    teacher = ctx.teacher_model()
    assert all(torch.equal(a, b) for a, b in zip(teacher.state_dict().values(), original.state_dict().values()))
    assert not any(p.requires_grad for p in teacher.parameters())
    rep = recipe.report()["distill"]
    assert rep["sparsity_kept"] == pytest.approx(0.5) and rep["sparsity_after"] == pytest.approx(0.5)
    masks = zero_masks(pruned_only)
    for name, zero in masks.items():  # the very same positions are zero
        assert torch.equal(model.get_submodule(name).weight == 0, zero)
    assert sparsity(zero_masks(model), model) == pytest.approx(0.5)
    # KD moved the pruned student towards its teacher
    from compress.kernels.losses import kd_kl

    with torch.no_grad():
        t_logits = teacher(input_ids=ids["input_ids"]).logits
        gap_before = kd_kl(pruned_only(input_ids=ids["input_ids"]).logits, t_logits).item()
        gap_after = kd_kl(model(input_ids=ids["input_ids"]).logits, t_logits).item()
    assert gap_after < gap_before
    assert rep["loss_last"] < rep["loss_first"]
    assert math.isfinite(heldout_loss(model, ids))


def test_lora_recovery_after_pruning_keeps_sparsity(tiny_tok, tmp_path):
    from compress.model.tiny import tiny_model
    from compress.pipeline.method import build_method
    from compress.pipeline.recipe import Recipe
    from compress.train.finetune import sparsity, zero_masks

    lora = build_method("lora", {"steps": 6, "train_samples": 16, "train_seqlen": 64, "lr": 1e-2, "heldout": 2, "lora_r": 4})
    recipe = Recipe([_TinyMagnitude(), lora])
    model = recipe.run(tiny_model("llama", seed=0), _ctx(tiny_tok))
    rep = recipe.report()["lora"]
    assert rep["heldout_loss_after"] < rep["heldout_loss_before"]
    assert type(model).__name__ == "LlamaForCausalLM" and not any("lora" in n for n, _ in model.named_parameters())
    assert sparsity(zero_masks(model), model) == pytest.approx(0.5)
    # --no-merge-adapters: the checkpoint holds the base plus the peft adapter, and reloads to the same numbers
    from compress.formats import load_checkpoint, save_checkpoint

    keep = build_method("lora", {"steps": 2, "train_samples": 8, "train_seqlen": 64, "lr": 1e-2, "heldout": 2,
                                 "lora_r": 4, "merge_adapters": False})
    wrapped = Recipe([keep]).run(tiny_model("llama", seed=0), _ctx(tiny_tok))
    out = save_checkpoint(wrapped, tiny_tok, tmp_path / "unmerged")
    assert (out / "adapter" / "adapter_config.json").is_file()
    ids = torch.randint(0, 256, (1, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(load_checkpoint(out)[0](input_ids=ids).logits, wrapped(input_ids=ids).logits)
    # kd_weight > 0 makes the stage ask for the teacher
    assert build_method("lora", {"kd_weight": 0.5}).needs.teacher and not lora.needs.teacher


def test_distill_refuses_quantized_student_and_mismatched_teacher(tiny_tok):
    from compress.model.tiny import tiny_model
    from compress.pipeline.method import build_method
    from compress.pipeline.recipe import Recipe

    with pytest.raises(ConfigError, match="distill needs float linear weights"):
        Recipe.from_specs([{"method": "rtn", "bits": 4, "group_size": 32}, {"method": "distill", "steps": 1}]).run(
            tiny_model("llama"), _ctx(tiny_tok))
    ctx = _ctx(tiny_tok)
    ctx.teacher = tiny_model("llama", vocab=300)
    with pytest.raises(ConfigError, match="vocabularies differ"):
        Recipe([build_method("distill", {"steps": 1})]).run(tiny_model("llama"), ctx)
    with pytest.raises(ConfigError, match="--layer-selection 'best' is not allowed"):
        build_method("distill", {"layer_selection": "best"})
    with pytest.raises(ConfigError, match="--kd-weight 1.5 is out of range"):
        build_method("distill", {"kd_weight": 1.5})


def test_cli_distill_layer_dropped_student_then_eval(tiny_model_dir, tmp_path):
    from click.testing import CliRunner
    from transformers import AutoModelForCausalLM

    from compress.cli import main
    from compress.model.tiny import tiny_model
    from compress.runs.results import read_records

    deeper = tmp_path / "tiny4"
    tiny_model("llama", seed=0, layers=4).save_pretrained(deeper)
    for f in tiny_model_dir.glob("tokenizer*"):
        (deeper / f.name).write_bytes(f.read_bytes())
    out = tmp_path / "student"
    common = ["--eval", "pydoc", "--eval-seqlen", "128", "--eval-windows", "2", "--no-progress"]
    res = CliRunner().invoke(main, ["distill", "--model", str(deeper), "--student-layers", "2", "--layer-selection",
                                    "importance", "--steps", "3", "--train-samples", "8", "--train-seqlen", "64",
                                    "--calib", "pydoc", "--nsamples", "4", "--seqlen", "64", "--output", str(out), *common],
                             catch_exceptions=False)
    assert res.exit_code == 0, res.output
    rec = read_records()[-1]
    assert rec["method"] == "distill" and rec["details"]["distill"]["blocks"] == "4 -> 2"
    assert rec["run"]["teacher"] == str(deeper)
    assert len(AutoModelForCausalLM.from_pretrained(str(out)).model.layers) == 2
    res = CliRunner().invoke(main, ["eval", "--model", str(out), *common], catch_exceptions=False)
    assert res.exit_code == 0, res.output
    assert read_records()[-1]["metrics"]["after"]["ppl_pydoc"]["value"] == pytest.approx(
        rec["metrics"]["after"]["ppl_pydoc"]["value"], rel=1e-4)


@pytest.mark.parametrize("recovery", ["distill", "lora"])
def test_recovery_after_wanda_keeps_its_sparse_layers(tiny_tok, recovery):
    """The real pruners store SparseLinear layers (float weights with a mask): recovery stages train them, keep
    exactly their zeros, and the result still stores sparse."""
    from compress.layers.sparse_linear import SparseLinear
    from compress.model.tiny import tiny_model
    from compress.pipeline.recipe import Recipe
    from compress.train.finetune import sparsity, zero_masks

    opts = {"steps": 3, "train_samples": 8, "train_seqlen": 64, "lr": 1e-3, "heldout": 2} if recovery == "lora" else \
        {"steps": 3, "train_samples": 8, "train_seqlen": 64, "lr": 1e-3}
    ctx = _ctx(tiny_tok)
    pruned = Recipe.from_specs([{"method": "wanda", "sparsity": 0.5}]).run(tiny_model("llama", seed=0), ctx)
    masks = zero_masks(pruned)
    assert masks and sparsity(masks, pruned) == pytest.approx(0.5, abs=0.01)
    before = {n: pruned.get_submodule(n).weight.detach().clone() for n in masks}
    model = Recipe([*Recipe.from_specs([{"method": recovery, **opts}]).stages]).run(pruned, _ctx(tiny_tok))
    changed = False
    for name, zero in masks.items():
        mod = model.get_submodule(name)
        assert isinstance(mod, SparseLinear)
        assert torch.equal(mod.weight == 0, zero)  # the very same zeros
        changed |= not torch.equal(mod.weight, before[name])
    assert changed  # the kept weights were trained
