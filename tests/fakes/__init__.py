"""Fakes of optional libraries, with the real libraries' types, errors and constants."""
