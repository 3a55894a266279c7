"""Benchmarks that run against a live server (`dsaserve bench serving`)."""
