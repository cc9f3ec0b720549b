"""KServe v2 / Triton inference protocol: tensors, the LLM contract, HTTP and gRPC."""
