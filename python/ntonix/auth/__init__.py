"""Gateway API keys: who is calling (keys → `Principal`), which models they may use, the admin key."""
