"""mailroom: receive email in your application (IMAP IDLE, Microsoft Graph) at a webhook."""

USER_AGENT = "mailroom/0.1 (+https://github.com/mailroom)"  # every HTTP request mailroom makes
