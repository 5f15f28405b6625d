"""mailer: sends the emails of an event-registration system."""
