"""Benchmarks and measured tables of MMIE Studio (`python -m bench ...`)."""
