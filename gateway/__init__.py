"""misskey-gateway: an authenticating reverse proxy in front of a Misskey server."""

__version__ = "0.1.0"
