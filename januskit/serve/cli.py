"""`januskit serve`: run the OpenAI-compatible server."""

from __future__ import annotations


def add_cli(sub) -> None:
    p = sub.add_parser("serve", help="OpenAI-compatible HTTP server and web page (chat with images, image generation)")
    p.add_argument("--model", default=None, help="checkpoint directory or hub id (default: the bundled model)")
    p.add_argument("--host", default="127.0.0.1", help="bind address (loopback by default)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--api-key", default=None, help="require Authorization: Bearer KEY on every endpoint but /health")
    p.add_argument("--allow-remote-urls", action="store_true", help="let image_url fetch http(s) URLs")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--compile", action="store_true",
                   help="compiled decode steps: CUDA graphs on a GPU (the first requests compile)")
    p.add_argument("--max-n", type=int, default=4, help="most images per generation request")
    p.add_argument("--max-tokens", type=int, default=1024, help="most new tokens per chat request")
    p.set_defaults(func=run)


def run(args) -> int:
    try:
        import uvicorn
    except ImportError:
        raise ValueError("serving needs FastAPI and uvicorn: pip install 'januskit[serve]'") from None
    from ..api import Janus
    from .app import Settings, create_app

    janus = Janus.from_pretrained(args.model, device=args.device, dtype=args.dtype, compile=args.compile)
    janus.warm_up()  # --compile: compile the decode steps before the first request, not during it
    name = janus.config.name if args.model is None else str(args.model).rstrip("/").split("/")[-1]
    settings = Settings(model_name=name, api_key=args.api_key, allow_remote_urls=args.allow_remote_urls,
                        max_n=args.max_n, max_tokens=args.max_tokens)
    uvicorn.run(create_app(janus, settings), host=args.host, port=args.port, log_level="info")
    return 0
