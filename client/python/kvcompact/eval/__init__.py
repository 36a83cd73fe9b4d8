"""Evaluation harness: what compaction does inside a real model (see quality.py)."""
