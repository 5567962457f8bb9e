"""Shared pytest fixtures. Several areas add fixtures here: keep each one small and self-contained."""
