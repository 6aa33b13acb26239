"""Family layer: the shared training loop, LoRA, fine-tuning data, fake-quant training, layer dropping."""
