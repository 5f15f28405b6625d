"""Delivery: the send path, the transports behind one protocol, and when to try again."""
