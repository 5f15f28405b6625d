"""Content: the words and bytes of a mail (templates, MIME, the calendar file)."""
