"""QAT: quantization-aware fine-tuning of every quantized weight through a fake quantizer.

The decoder blocks' linears start on an RTN (or GPTQ) grid; the forward pass uses the fake-quantized weights
w_hat = s * (round(clamp(w/s + z, 0, 2^b-1)) - z), the backward pass the straight-through estimator (Bengio et al.
2013, arXiv 1308.3432: identity inside the clipping range, zero outside); step sizes are fixed at the initial grid,
learned with LSQ (Esser et al. 2020, arXiv 1902.08153, eq. 3 and its gradient scale), or recomputed from each step's
min/max. Training is next-token cross-entropy on the run's calibration source, on the shared trainer; the result is
exported to the same packed-integer checkpoint as RTN/GPTQ.
"""
from __future__ import annotations

from dataclasses import dataclass

from compress.core.config import option
from compress.layers.fake_quant_linear import SCALE_MODES
from compress.pipeline.method import Method, Needs, register
from compress.train.fake_quant import QuantTrainConfig, run_quant_training, training_sequences


@dataclass
class QATConfig(QuantTrainConfig):
    lr: float = option(1e-4, "peak learning rate (AdamW)", range=(0.0, 1.0))
    scale_mode: str = option("lsq", "step sizes during training: fixed (the initial grid), lsq (learned, LSQ gradient), "
                                    "minmax (recomputed from the weights at every step)", choices=SCALE_MODES)


@register("qat", family="training-aware", summary="Quantization-aware training: all quantized weights fine-tuned through a "
          "fake quantizer (STE; LSQ step sizes optional), exported as packed integers",
          paper="STE: Bengio et al. 2013, arXiv 1308.3432; LSQ: Esser et al. 2020, arXiv 1902.08153")
class QAT(Method):
    Config = QATConfig
    needs = Needs(calibration=True, gradients=True)

    def describe(self) -> str:
        return self.config.describe(self.config.scale_mode)

    def apply(self, model, ctx):
        ids, record = training_sequences(ctx, model, self.config)
        return run_quant_training(self, model, ctx, ids, train_weights=True, scale_mode=self.config.scale_mode,
                                  data_record=record)
