# The C extension (_capture.c): mesh.llama.native loads it by path with ctypes.CDLL.
