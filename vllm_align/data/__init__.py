"""Data production with the alignment engine (preference pairs)."""
