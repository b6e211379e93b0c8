"""Benchmarks: scripts that print figures (``python -m fedrec.simulations.bench.<name>``); none
is a timed test."""
