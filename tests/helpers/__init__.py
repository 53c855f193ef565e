"""Shared test code, not tests: tiny local models (`tiny_models`), float64 oracles (`oracle`), the fuzz property (`fuzz`)."""
