"""Simulation only: the synthetic world, MovieLens scenarios, the Simulation Engine runner,
``fedrec simulate``, baselines and benchmarks (``bench/``)."""
