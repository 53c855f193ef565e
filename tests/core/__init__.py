"""Tests of one area (core); see tests/README.md."""
