"""The llama.cpp bindings (ctypes over llama-cpp-python) and the plain one-context reference run."""
