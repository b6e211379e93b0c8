"""fedrec server side: ServerApp, strategy, central item encoder, run directory."""
