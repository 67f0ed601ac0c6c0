"""The agents: one module per job, each named for what it does."""
