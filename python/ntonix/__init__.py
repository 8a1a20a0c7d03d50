"""NTONIX: an OpenAI-compatible inference gateway for local LLM clusters.

The public surface is small on purpose: the version, the settings type and the
application factory. Everything else is an implementation detail.
"""

from __future__ import annotations

__version__ = "0.1.0"
__all__ = ["__version__"]
