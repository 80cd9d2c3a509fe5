"""Data-plane (gateway) tests."""
