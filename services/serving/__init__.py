"""The serving replica: engine, adapter tiers, OpenAI-compatible API, replica agent."""
