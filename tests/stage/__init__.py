"""Real llama.cpp in one process: runtime, slicing, families, parity, the draft model."""
