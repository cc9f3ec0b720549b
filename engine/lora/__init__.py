"""LoRA adapters on the model: PEFT files in, stacked device slots, the per-step deltas."""
