"""The jobs domain of the admin API."""
