"""`mailer serve`: the HTTP boundary. Intake for registration systems in any language, and (as it
grows) the delivery API and dashboard; errors are mapped to RFC 9457 problem details here, once."""
