"""Benchmarks that write JSON and PNG: detection overhead (Fig. 6), index scaling, memory, fleet."""
