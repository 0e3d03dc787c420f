"""The user's agents: YAML files in AGENTS_DIR, validated, matched to calls and reloaded,
with the tools, knowledge and post-call analysis they declare (docs/agents.md)."""
