"""Pure logic: no model file, no llama.cpp, no processes (python -m pytest tests/unit)."""
