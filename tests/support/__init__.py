"""Scaffolding shared by the tests and the benchmark scripts."""
