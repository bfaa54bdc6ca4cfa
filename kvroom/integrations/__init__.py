"""Adapters that plug kvroom into serving engines.

Each adapter depends on kvroom's public API and on its engine (an optional
extra); nothing in kvroom depends on an adapter.
"""
