"""Strategies: pure functions of the machine's state to a list of actions (DESIGN section 4)."""
