"""Tests of kvroom driven by SGLang 0.5.23 (run by make test-sglang)."""
