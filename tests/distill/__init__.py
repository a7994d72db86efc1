"""Tests of mispo.distill (a package so its module names do not clash with tests/algorithms)."""
