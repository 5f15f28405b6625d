"""Ops: what operators run and look at beside the flow (health, previews, the embedded Redis)."""
