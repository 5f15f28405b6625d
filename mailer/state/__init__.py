"""The state layer: every Redis key, command and Lua script mailer uses, typed (see redis_types)."""
