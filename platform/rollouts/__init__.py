"""Rollout requests and plans: what the control plane, the trainer (auto-rollout) and the rollout
controller share about moving a policy's serving pointer."""
