"""The admin tokens domain of the admin API."""
