"""The test suite: a package, so every test imports shared code as `tests.…` from the repository root."""
