"""Prefill/decode disaggregation: roles, the bootstrap server, KV transfer backends, page runs."""
