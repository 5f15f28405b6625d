"""Intake: how registration events and job bodies come in, and are checked before anything runs."""
