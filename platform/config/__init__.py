"""Process settings: one object built once from ``LORAFLEET_*`` variables and passed in."""

from lorafleet.platform.config.settings import Settings, load_settings

__all__ = ["Settings", "load_settings"]
