"""Code shared by server and client: config, wire contract, models, metrics, privacy."""
