"""balance package."""
