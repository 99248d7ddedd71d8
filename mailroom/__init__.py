"""mailroom: receive email in your application (IMAP IDLE, Microsoft Graph) at a webhook."""

from importlib.metadata import PackageNotFoundError, version

try:
    VERSION = version("mailroom-incoming")  # the distribution's name: pyproject.toml
except PackageNotFoundError:  # imported from a clone that was never installed
    VERSION = "0+unknown"
__version__ = VERSION

# Every HTTP request mailroom makes (RFC 9110 §10.1.5). The product and its version only: the
# project has no public home page to name in a comment.
USER_AGENT = f"mailroom/{VERSION}"
