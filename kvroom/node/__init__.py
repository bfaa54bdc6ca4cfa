"""Node machinery: one process's prefill and decode sides, below the API."""
