"""Constrained decoding: grammars (llguidance) that mask each constrained row's logits."""
