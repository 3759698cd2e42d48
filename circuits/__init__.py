"""Interpretation on top of notekv: scenarios, sweeps, discovery and reports."""
