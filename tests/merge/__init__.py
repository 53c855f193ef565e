"""Tests of one area (merge); see tests/README.md."""
