"""The rollout controller: two-stage warm → expose of adapter revisions, and rollback.

schemas     what a rollout asks for and what the controller records per replica
planner     pure decisions: which replicas, and what to do given their progress
requests    database operations: create / cancel a rollout, roll a policy back
client      HTTP client of the serving replicas (agent endpoints, smoke generation)
controller  the loop: lease, warm, smoke, flip, fail, unpin; process entry points
cli         calls behind ``lorafleet policies rollout|rollback|status``
"""

from lorafleet.platform.rollouts.requests import cancel_rollout, create_rollout, request_rollout, rollback
from lorafleet.platform.rollouts.schemas import ReplicaCount, ReplicaPhase, SmokeSpec, TargetSpec
from lorafleet.services.rollout.controller import RolloutController
from lorafleet.services.rollout.options import ControllerOptions
from lorafleet.services.rollout.process import run_controller, serve_controller, start_background

__all__ = [
    "ControllerOptions",
    "ReplicaCount",
    "ReplicaPhase",
    "RolloutController",
    "SmokeSpec",
    "TargetSpec",
    "cancel_rollout",
    "create_rollout",
    "request_rollout",
    "rollback",
    "run_controller",
    "serve_controller",
    "start_background",
]
