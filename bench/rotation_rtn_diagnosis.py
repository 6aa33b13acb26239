"""Why rotate -> RTN is worse than RTN on SmolLM2 while rotate -> GPTQ is better: the weights' error, not the inputs'.

    python bench/rotation_rtn_diagnosis.py [--bits 3] [--group-size 64] [--nsamples 4] [--seqlen 512] [--blocks 0,10,20,29]

For the original and the rotated (R1 Hadamard + online R4, `rotate`) float model, every decoder linear of the
chosen blocks: the relative weight error of RTN on the grid, ||W - Q(W)||^2 / ||W||^2; the excess kurtosis of the
weights within each group (a Gaussian group: 0; a uniform one: -1.2); and the relative output error on calibration
inputs, tr(dW S dW^T) / tr(W S W^T) with S = E[x x^T] of that linear's inputs (C4 train, --nsamples x --seqlen, the
same tokens through both models). Also how many groups of 32 of the original weights hold at most 16 distinct values
(the model's linears were GGUF Q4_1, so all of them do), and how much each RMSNorm's scale g suppresses the channels
where its normalized input xhat has its energy (k < 1: it does; folding g into the weights and rotating undoes that
suppression for the quantization error). Medians over the linears; prints date, commit and load.
"""
from __future__ import annotations

import argparse
import datetime
import os
import statistics
import subprocess
from pathlib import Path

import torch
import torch.nn as nn

from compress.kernels.quant_grid import QuantSpec, rtn_quantize
from compress.layers.online_hadamard import OnlineHadamardLinear
from compress.quant.rotation import rotate_model
from compress.sources.data import get_calibration
from compress.sources.models import load_model

REPO = Path(__file__).resolve().parent.parent


def _linears(model: nn.Module, blocks: set[int]) -> dict[str, nn.Module]:
    """{name: module whose forward input is the quantizer's input}: nn.Linear, or the inner linear of an online
    Hadamard (its input is the rotated one)."""
    out = {}
    for name, mod in model.named_modules():
        parts = name.split(".")
        i = parts.index("layers") + 1 if "layers" in parts else len(parts)
        if i >= len(parts) or int(parts[i]) not in blocks:
            continue
        if isinstance(mod, nn.Linear) and ".down_proj" not in name:
            out[name] = mod
        elif name.endswith("down_proj.linear") or (name.endswith("down_proj") and isinstance(mod, nn.Linear)):
            out[name.removesuffix(".linear")] = mod
    return out


@torch.no_grad()
def _input_moments(model: nn.Module, lins: dict[str, nn.Module], ids: torch.Tensor) -> dict[str, torch.Tensor]:
    acc = {n: None for n in lins}
    hooks = []
    for n, m in lins.items():
        def hook(_m, args, _out, n=n):
            x = args[0].reshape(-1, args[0].shape[-1]).float()
            acc[n] = x.t() @ x if acc[n] is None else acc[n] + x.t() @ x
        hooks.append(m.register_forward_hook(hook))
    for row in ids:
        model(input_ids=row[None])
    for h in hooks:
        h.remove()
    return acc


@torch.no_grad()
def _gamma_suppression(model: nn.Module, ids: torch.Tensor) -> dict[str, list[float]]:
    """Per block and norm: k = sum_j g_j^2 E[xhat_j^2] / (mean(g^2) sum_j E[xhat_j^2]), xhat the normalized input
    before the norm's scale g (k < 1: g is small where xhat has its energy), and the energy share of the top 3
    channels. Folding g into the next linears and rotating (R1) hands that energy to every input direction."""
    acc: dict[str, list[torch.Tensor]] = {}
    hooks = []
    for i, blk in enumerate(model.model.layers):
        for kind in ("input_layernorm", "post_attention_layernorm"):
            def hook(mod, args, _out, key=(i, kind)):
                x = args[0].reshape(-1, args[0].shape[-1]).float()
                acc.setdefault(key, []).append((x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)).pow(2).mean(0))
            hooks.append(getattr(blk, kind).register_forward_hook(hook))
    for row in ids:
        model(input_ids=row[None])
    for h in hooks:
        h.remove()
    out: dict[str, list[float]] = {"input_layernorm": [], "post_attention_layernorm": [], "top3 share": []}
    for (i, kind), v in acc.items():
        e = torch.stack(v).mean(0)
        g2 = getattr(model.model.layers[i], kind).weight.float() ** 2
        out[kind].append(float((g2 * e).sum() / (g2.mean() * e.sum())))
        out["top3 share"].append(float(e.topk(3).values.sum() / e.sum()))
    return out


def _kurtosis(w: torch.Tensor, g: int) -> float:
    x = w.double().reshape(w.shape[0], -1, g)
    x = x - x.mean(-1, keepdim=True)
    m2 = (x ** 2).mean(-1)
    m4 = (x ** 4).mean(-1)
    return float((m4 / m2.clamp(min=1e-30) ** 2 - 3).median())


def _measure(model, lins, moments, spec) -> dict[str, float]:
    werr, oerr, kurt = [], [], []
    per = {}
    for n, m in lins.items():
        w = m.weight.detach().float()
        dw = rtn_quantize(w, spec).dequantize() - w
        s = moments[n]
        werr.append(float((dw ** 2).sum() / (w ** 2).sum()))
        oerr.append(float(((dw @ s) * dw).sum() / ((w @ s) * w).sum()))  # tr(dW S dW^T) / tr(W S W^T)
        kurt.append(_kurtosis(w, spec.group_size if spec.group_size > 0 else w.shape[1]))
        per[n] = oerr[-1]
    return {"weight err": statistics.median(werr), "output err": statistics.median(oerr),
            "kurtosis": statistics.median(kurt), "per": per}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--bits", type=int, default=3)
    ap.add_argument("--group-size", type=int, default=64)
    ap.add_argument("--nsamples", type=int, default=4)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--blocks", default="0,10,20,29")
    args = ap.parse_args()
    blocks = {int(b) for b in args.blocks.split(",")}
    spec = QuantSpec(args.bits, args.group_size)
    commit = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    load = subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    print(f"date {datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds')}  commit {commit}\nload: {load}")
    print(f"SmolLM2-135M-Instruct float32; RTN {spec.label()}; blocks {sorted(blocks)}; inputs: c4 train "
          f"{args.nsamples} x {args.seqlen} (seed 0)")
    loaded = load_model("smollm2", dtype="float32")
    model = loaded.model.eval()
    calib = get_calibration("c4", loaded.tokenizer, nsamples=args.nsamples, seqlen=args.seqlen, seed=0,
                            data_dir=os.environ.get("COMPRESS_DATA_DIR"))
    lins = _linears(model, blocks)
    distinct = [int(torch.unique(grp).numel() <= 16) for m in lins.values()
                for grp in m.weight.detach().reshape(-1, 32)[:: 97]]
    print(f"original groups of 32 with <= 16 distinct values: {sum(distinct)}/{len(distinct)} (sampled)")
    sup = _gamma_suppression(model, calib.input_ids)
    print("norm scale vs input energy, k = sum g^2 E[xhat^2] / (mean g^2 sum E[xhat^2]) over the 30 blocks (median, "
          "min): input_layernorm %.3f, %.3f; post_attention_layernorm %.3f, %.3f; top-3 channels' share of E[xhat^2] "
          "median %.3f" % (statistics.median(sup["input_layernorm"]), min(sup["input_layernorm"]),
                           statistics.median(sup["post_attention_layernorm"]), min(sup["post_attention_layernorm"]),
                           statistics.median(sup["top3 share"])))
    rows = {"original": _measure(model, lins, _input_moments(model, lins, calib.input_ids), spec)}
    rotate_model(model, r1="hadamard", online=True, seed=0)
    lins = _linears(model, blocks)
    assert any(isinstance(m, OnlineHadamardLinear) for m in model.modules())
    rows["rotated"] = _measure(model, lins, _input_moments(model, lins, calib.input_ids), spec)
    print(f"{'model':<10}{'median ||dW||^2/||W||^2':>26}{'median output err':>20}{'median group kurtosis':>24}")
    for k, r in rows.items():
        print(f"{k:<10}{r['weight err']:>26.5f}{r['output err']:>20.5f}{r['kurtosis']:>24.3f}")
    o, r = rows["original"], rows["rotated"]
    ratio = {n: r["per"][n] / o["per"][n] for n in o["per"]}
    print("output error rotated / original, by linear (largest first):")
    for n in sorted(ratio, key=ratio.get, reverse=True)[:12]:
        print(f"  {n:<40}{o['per'][n]:>10.5f}{r['per'][n]:>10.5f}  x{ratio[n]:.2f}")
    kinds = sorted({n.rsplit('.', 1)[1] for n in ratio})
    print("by kind (median ratio): " + ", ".join(f"{k} x{statistics.median(v for n, v in ratio.items() if n.endswith(k)):.2f}"
                                            for k in kinds))
    print(f"rotated / original: weight error x{r['weight err'] / o['weight err']:.2f}, output error "
          f"x{r['output err'] / o['output err']:.2f}")


if __name__ == "__main__":
    main()
