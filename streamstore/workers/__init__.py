"""The background work of a deployment: the persister (feeds -> history), the sweeper (expiry,
retention, trimming) and the worker's health and metrics endpoint."""
