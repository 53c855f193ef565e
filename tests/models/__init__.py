"""Tests of one area (models); see tests/README.md."""
