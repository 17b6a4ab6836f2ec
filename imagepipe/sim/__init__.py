"""Capacity simulator: a working day of logins against the real planner, in seconds."""
