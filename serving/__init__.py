"""Serving on the platform's side: ranking a channel's items for its users (and a query) from a
trained run. Reads the platform's own data and the run's checkpoints; sends nothing."""
