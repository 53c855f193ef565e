"""Tests of one area (cli); see tests/README.md."""
