"""Prefect flows and the autolabel CLI."""
