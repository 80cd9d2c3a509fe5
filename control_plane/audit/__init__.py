"""The audit domain of the admin API."""
