"""Per-key rate limits: requests and tokens per minute (GCRA, see docs/adr/008-rate-limits.md)."""
