"""vitcrs: column-row sampled backward passes for Vision Transformers."""
