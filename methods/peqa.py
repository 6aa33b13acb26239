"""PEQA: parameter-efficient and quantization-aware adaptation (Kim et al. 2023, arXiv 2305.14152).

Quantize every linear of the decoder blocks (RTN or GPTQ), freeze the integer codes and zero points, and train only
the step sizes: W_hat = (s_0 + delta_s) * (W_bar - z_0) (Sec. 3.1, eq. 2), one scale per output channel (or per
group). The optimizer holds nothing but the scale tensors, so the trainable parameter count is the number of scales.
Scales are trained as the float16 values the checkpoint stores; the export is the initial integer checkpoint with
the new scales.
"""
from __future__ import annotations

from dataclasses import dataclass

from compress.core.config import option
from compress.core.errors import CompressError
from compress.pipeline.method import Method, Needs, register
from compress.train.fake_quant import QuantTrainConfig, run_quant_training, training_sequences


@dataclass
class PEQAConfig(QuantTrainConfig):
    lr: float = option(5e-4, "peak learning rate (AdamW)", range=(0.0, 1.0))


@register("peqa", family="training-aware", summary="PEQA: integer codes frozen, only the per-channel/group scales trained",
          paper="Kim et al. 2023, arXiv 2305.14152")
class PEQA(Method):
    Config = PEQAConfig
    needs = Needs(calibration=True, gradients=True)

    def describe(self) -> str:
        return self.config.describe("scales-only")

    def apply(self, model, ctx):
        ids, record = training_sequences(ctx, model, self.config)
        model = run_quant_training(self, model, ctx, ids, train_weights=False, scale_mode="fixed", learn_scale=True,
                                   data_record=record)
        if self.report["training"]["trainable_params"] != self.report["scales"] or self.report["trained_tensors"] != ["weight_scale"]:
            raise CompressError(f"peqa trained {self.report['trained_tensors']} ({self.report['training']['trainable_params']} "
                                f"parameters), not only the {self.report['scales']} scales")
        return model
