"""Real-model checks of QLoRA and distillation on SmolLM2-135M-Instruct (run with --real; tiny budgets: a few steps
of 2 x 128 tokens, held-out and perplexity on a few 128/256-token windows)."""
import copy

import pytest
import torch

from compress.pipeline.recipe import Recipe, RunContext
from compress.sources.data import get_calibration

pytestmark = pytest.mark.real


def _ctx(real_loaded, data_dir):
    cal = get_calibration("wikitext2", real_loaded.tokenizer, nsamples=4, seqlen=128, data_dir=str(data_dir))
    return RunContext(tokenizer=real_loaded.tokenizer, calibration=cal, data_dir=str(data_dir), progress=False,
                      model_dtype=torch.bfloat16)


def test_qlora_nf4_size_training_and_peft_reload(real_loaded, real_model, data_dir, tmp_path):
    from peft import PeftModel

    from compress.evals.size import model_size
    from compress.layers.nf4 import quantize_model_nf4
    from compress.train.trainer import heldout_loss

    recipe = Recipe.from_specs([{"method": "qlora", "steps": 4, "train_samples": 8, "train_seqlen": 128,
                                 "train_batch_size": 2, "heldout": 4, "lr": 1e-3, "warmup": 0.0,
                                 "adapter_dir": str(tmp_path / "adapter")}])
    model = recipe.run(real_model, _ctx(real_loaded, data_dir))
    rep = recipe.report()["qlora"]
    size = model_size(model)
    print(f"QLoRA on SmolLM2: {size['bits_per_weight']} bits/weight (NF4 b64 + double quant), held-out loss "
          f"{rep['heldout_loss_before']} -> {rep['heldout_loss_after']} in 4 steps")
    assert size["bits_per_weight"] == pytest.approx(4.127, abs=1e-3)
    assert size["adapter_params"] == 30 * 8 * (2 * (576 + 576) + 2 * (576 + 192) + 3 * (576 + 1536))
    assert rep["heldout_loss_after"] < rep["heldout_loss_before"]
    # peft reloads the adapter onto a freshly NF4-quantized base and reproduces the held-out loss
    base = copy.deepcopy(real_loaded.model)
    quantize_model_nf4(base, progress=False)
    again = PeftModel.from_pretrained(base, str(tmp_path / "adapter")).eval()
    from compress.sources.data import eval_text, tokenize_text

    stream = tokenize_text(eval_text("wikitext2", str(data_dir)), real_loaded.tokenizer)[0]
    held = {"input_ids": stream[:4 * 128].view(4, 128)}
    assert heldout_loss(again, held, 2) == pytest.approx(rep["heldout_loss_after"], rel=1e-5)


def test_layer_dropped_student_distills_and_loads_with_automodel(real_loaded, real_model, data_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    from compress.evals.perplexity import perplexity
    from compress.formats import save_checkpoint
    from compress.train.layer_drop import drop_blocks, uniform_keep

    tok = real_loaded.tokenizer
    ev = dict(seqlen=256, max_windows=4, data_dir=str(data_dir), progress=False)
    dropped = drop_blocks(copy.deepcopy(real_model), uniform_keep(30, 15))
    ppl_dropped = perplexity(dropped, tok, "wikitext2", **ev)["value"]
    del dropped
    ctx = _ctx(real_loaded, data_dir)
    ctx.teacher = real_loaded.model
    recipe = Recipe.from_specs([{"method": "distill", "student_layers": 15, "steps": 4, "train_samples": 8,
                                 "train_seqlen": 128, "train_batch_size": 2, "lr": 3e-4, "warmup": 0.0}])
    student = recipe.run(real_model, ctx)
    ppl_kd = perplexity(student, tok, "wikitext2", **ev)["value"]
    print(f"15-block SmolLM2 student, wikitext2@256x4: dropped {ppl_dropped:.1f}, after 4 KD steps {ppl_kd:.1f}")
    assert recipe.report()["distill"]["kept_blocks"] == uniform_keep(30, 15)
    assert ppl_kd < ppl_dropped
    out = save_checkpoint(student, tok, tmp_path / "student")
    loaded = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.bfloat16)
    assert loaded.config.num_hidden_layers == 15 and len(loaded.model.layers) == 15
    assert perplexity(loaded, tok, "wikitext2", **ev)["value"] == pytest.approx(ppl_kd, rel=1e-4)
