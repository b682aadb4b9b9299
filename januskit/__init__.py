"""januskit: DeepSeek Janus / Janus-Pro in compact PyTorch."""

__version__ = "0.1.0"
