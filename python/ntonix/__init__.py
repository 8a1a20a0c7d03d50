"""NTONIX: an OpenAI-compatible inference gateway for local LLM clusters.

The package root exports only `__version__`. The ways in are the `ntonix`
command (`ntonix.cli:main`) and the RSGI application Granian serves
(`ntonix.app:app`); everything else is an implementation detail.
"""

from __future__ import annotations

__version__ = "0.1.0"
__all__ = ["__version__"]
