"""The engines domain of the admin API."""
