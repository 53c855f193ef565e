"""Tests of one area (pipeline); see tests/README.md."""
