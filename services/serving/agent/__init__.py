"""The serving replica's agent: registration, heartbeat of resident adapters, internal endpoints."""

from lorafleet.services.serving.agent.agent import ReplicaAgent, ResidentEntry, ResidentReport
from lorafleet.services.serving.agent.routes import internal_router

__all__ = ["ReplicaAgent", "ResidentEntry", "ResidentReport", "internal_router"]
