"""Model execution: the model runner (the only place engine state becomes tensors), models,
attention backends, loaders, sampler, quantization and the CPU fast paths."""
