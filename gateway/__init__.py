"""gateway: an OpenAI-compatible gateway in front of DeepInfra with per-caller spend accounting."""

__version__ = "0.1.0"
