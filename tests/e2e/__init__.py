"""Stage processes, `mesh serve` and sockets: the mesh end to end."""
