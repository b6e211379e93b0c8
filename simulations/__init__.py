"""The fedrec command line, scenarios, runners, baselines, benchmarks and audits."""
