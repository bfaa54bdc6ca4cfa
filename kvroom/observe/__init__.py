"""Observers: audit events, Prometheus metrics, audit replay and diagrams; below the API."""
