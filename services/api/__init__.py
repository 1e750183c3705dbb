"""The control-plane API service."""

from lorafleet.services.api.app import create_app
from lorafleet.services.api.bootstrap import bootstrap

__all__ = ["bootstrap", "create_app"]
