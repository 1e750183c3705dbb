"""The OpenAI-compatible HTTP surface of a serving replica."""

from lorafleet.services.serving.api.resolver import Resolver, Target
from lorafleet.services.serving.api.routes import REVISION_HEADER, openai_router

__all__ = ["REVISION_HEADER", "Resolver", "Target", "openai_router"]
