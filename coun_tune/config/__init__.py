"""Typed, validated configs loaded from YAML (always with yaml.safe_load)."""
