"""Tests of one area (convert); see tests/README.md."""
