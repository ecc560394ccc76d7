"""Model facts: where a GGUF comes from, which families are supported, and how a model is sliced."""
