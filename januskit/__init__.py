"""januskit: DeepSeek Janus / Janus-Pro in compact PyTorch."""

__version__ = "0.1.0"

__all__ = ["Janus", "JanusError", "ChatReply", "ImageResult", "JanusConfig", "preset"]


def __getattr__(name):
    # Imported on first use, so `import januskit.config` stays light and free of torch start-up cost.
    if name in ("Janus", "JanusError", "ChatReply", "ImageResult"):
        from . import api

        return getattr(api, name)
    if name in ("JanusConfig", "preset"):
        from . import config

        return getattr(config, name)
    raise AttributeError(f"module 'januskit' has no attribute {name!r}")
