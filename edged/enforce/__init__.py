"""Enforcement backends: the only code that acts on processes (DESIGN section 5)."""
