"""--stream: a model compressed block by block from its safetensors folder (skeleton on meta, one block in memory)
writes the very tensors and quantization_config of the in-memory run; streamed perplexity equals perplexity()."""
import json

import pytest
import torch

from compress.core.errors import ConfigError
from compress.pipeline.recipe import Recipe, RunContext


def _calib(n=8, L=32):
    from compress.sources.data import Calibration, TextSource

    return Calibration(torch.randint(0, 256, (n, L), generator=torch.Generator().manual_seed(3)),
                       TextSource("test", "random", "-", "-"), 0)


def _folder(tmp_path, arch="llama", dtype=torch.float32, **kw):
    from compress.model.tiny import tiny_model, tiny_tokenizer

    model = tiny_model(arch, seed=2, hidden=64, intermediate=128, layers=3, dtype=dtype, **kw)
    folder = tmp_path / f"src-{arch}"
    model.save_pretrained(folder, max_shard_size="200KB")  # several shards: blocks read across files
    tiny_tokenizer().save_pretrained(folder)
    return folder


def _tensors(folder):
    from compress.formats.base import read_safetensors

    return read_safetensors(folder)


SPECS = {"rtn": [{"method": "rtn", "bits": 4, "group_size": 32}],
         "gptq": [{"method": "gptq", "bits": 3, "group_size": 32, "act_order": True}],
         "wanda": [{"method": "wanda", "sparsity": 0.5}]}


@pytest.mark.parametrize("method", list(SPECS))
@pytest.mark.parametrize("arch,dtype", [("llama", torch.float32), ("qwen2", torch.bfloat16)])
def test_streamed_run_writes_the_in_memory_checkpoint_bit_for_bit(method, arch, dtype, tmp_path, tiny_tok):
    from transformers import AutoModelForCausalLM

    from compress.formats import save_checkpoint
    from compress.pipeline.stream import stream_compress

    src = _folder(tmp_path, arch, dtype)
    calib = _calib() if method != "rtn" else None
    info = {"method": method, "setting": "x"}
    recipe = Recipe.from_specs(SPECS[method])
    model = AutoModelForCausalLM.from_pretrained(src, dtype=dtype).eval()
    model.config.use_cache = False
    model = recipe.run(model, RunContext(calibration=calib, progress=False))
    mem = save_checkpoint(model, tiny_tok, tmp_path / "mem", quant_info=info)
    recipe = Recipe.from_specs(SPECS[method])
    out = tmp_path / "streamed"
    stream_compress(src, recipe.stages, RunContext(calibration=calib, progress=False), out, tiny_tok,
                    quant_info=info, stage_specs=recipe.specs(), dtype=dtype)
    a, b = _tensors(mem), _tensors(out)
    assert sorted(a) == sorted(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k
    ca, cb = (json.loads((p / "config.json").read_text()) for p in (mem, out))
    assert ca == cb
    assert len(json.loads((out / "model.safetensors.index.json").read_text())["weight_map"]) == len(b)
    assert not list(out.glob(".part-*"))


def test_streamed_perplexity_equals_in_memory_perplexity(tmp_path, tiny_tok):
    from transformers import AutoModelForCausalLM

    from compress.evals.perplexity import perplexity, streamed_perplexity
    from compress.formats import load_checkpoint
    from compress.pipeline.stream import stream_compress

    src = _folder(tmp_path)
    kw = dict(dataset="pydoc", seqlen=64, max_windows=3, progress=False)
    float_model = AutoModelForCausalLM.from_pretrained(src).eval()
    ref = perplexity(float_model, tiny_tok, **kw)
    got = streamed_perplexity(src, tiny_tok, **kw)
    assert got["protocol_key"] == ref["protocol_key"]
    assert got["value"] == pytest.approx(ref["value"], rel=1e-6)
    recipe = Recipe.from_specs(SPECS["gptq"])
    out = tmp_path / "streamed"
    stream_compress(src, recipe.stages, RunContext(calibration=_calib(), progress=False), out, tiny_tok,
                    stage_specs=recipe.specs())
    loaded, _, _ = load_checkpoint(out)
    ref_q = perplexity(loaded, tiny_tok, **kw)
    got_q = streamed_perplexity(out, tiny_tok, **kw)
    assert got_q["value"] == pytest.approx(ref_q["value"], rel=1e-6)
    assert got_q["value"] != pytest.approx(got["value"], rel=1e-6)  # it did read the quantized blocks


def test_stream_refuses_model_level_and_whole_model_methods(tmp_path, tiny_tok):
    from compress.pipeline.stream import stream_compress

    src = _folder(tmp_path)
    for spec, msg in [({"method": "llm-pruner"}, "llm-pruner works on the whole model"),
                      ({"method": "owl", "sparsity": 0.5}, "owl prepares on the whole model")]:
        with pytest.raises(ConfigError, match=msg):
            stream_compress(src, Recipe.from_specs([spec]).stages, RunContext(progress=False), tmp_path / "o", tiny_tok)
        assert not (tmp_path / "o").exists()


def test_stream_refuses_a_layout_transformers_converts_on_load(tmp_path):
    from compress.core.errors import ModelError
    from compress.pipeline.stream import StreamedModel

    src = _folder(tmp_path, "mixtral")  # transformers 5 saves Mixtral experts per expert (w1/w2/w3), fuses on load
    with pytest.raises(ModelError, match=r"--stream: .* stores 'model.layers.0.block_sparse_moe"):
        StreamedModel(src)


def test_cli_stream_on_equals_in_memory_run(tiny_model_dir, tmp_path):
    from tests.test_cli import QUICK, _run as cli
    from compress.runs.results import read_records

    recs = {}
    for mode in ("off", "on"):
        out = tmp_path / f"ckpt-{mode}"
        res = cli(["quantize", "--method", "gptq", "--bits", "4", "--group-size", "32", "--model", str(tiny_model_dir),
                   "--output", str(out), "--stream", mode, *QUICK], tmp_path)
        assert res.exit_code == 0, res.output
        recs[mode] = read_records()[-1]
    on, off = recs["on"], recs["off"]
    assert on["streamed"]["reason"] == "--stream on" and "streamed" not in off
    a, b = _tensors(tmp_path / "ckpt-off"), _tensors(tmp_path / "ckpt-on")
    assert sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a)
    for when in ("before", "after"):
        x, y = off["metrics"][when]["ppl_pydoc"], on["metrics"][when]["ppl_pydoc"]
        assert x["protocol_key"] == y["protocol_key"] and y["value"] == pytest.approx(x["value"], rel=1e-5)
    assert on["size"]["bits_per_weight"] == off["size"]["bits_per_weight"]
    assert on["coverage"] == off["coverage"]
    assert on["calibration"] == off["calibration"]


def test_cli_stream_refusals_are_one_line(tiny_model_dir, tmp_path):
    from tests.test_cli import _run as cli

    for extra, msg in [(["--export", "gptq"], "--stream: --export needs the whole model"),
                       (["--tasks", "piqa"], "--stream: --tasks needs the whole model")]:
        res = cli(["quantize", "--method", "rtn", "--model", str(tiny_model_dir), "--stream", "on", "--output",
                   str(tmp_path / "x"), *extra], tmp_path)
        assert res.exit_code != 0 and msg in res.output, res.output
        assert not (tmp_path / "x").exists()


def test_streamed_run_holds_no_embeddings_or_head_after_writing_them(tmp_path, tiny_tok, monkeypatch):
    """RTN needs no capture: the non-block tensors are written first and freed at once, not kept for the pass."""
    from compress.pipeline import stream as st
    from compress.pipeline.stream import stream_compress

    src = _folder(tmp_path)
    recipe = Recipe.from_specs(SPECS["rtn"])
    seen = []

    real = st.StreamedModel.load_block

    def load_block(self, i):
        seen.append([n for n, p in self.model.named_parameters() if not n.startswith(self.prefix + ".") and not p.is_meta])
        return real(self, i)

    monkeypatch.setattr(st.StreamedModel, "load_block", load_block)
    facts = stream_compress(src, recipe.stages, RunContext(progress=False), tmp_path / "o", tiny_tok,
                            stage_specs=recipe.specs())
    assert seen == [[]] * 3
    assert all(p.is_meta for p in facts["model"].parameters())
