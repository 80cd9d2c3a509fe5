"""The deployments domain of the admin API."""
