"""Adapters that let serving engines drive kvroom; they depend on the API, nothing depends on them."""
