"""LoRA fine-tuning of the inpainting model: the mask library, synthetic pairs, the Ray Train loop."""
