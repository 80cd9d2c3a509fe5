"""The tenancy domain of the admin API."""
