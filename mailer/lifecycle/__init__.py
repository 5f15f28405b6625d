"""Lifecycle: which messages an event yields and when (the planner, the scheduler, the kinds table)."""
