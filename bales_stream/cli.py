"""The ``bales-stream`` command: serve, send, info, config.

Examples::

    bales-stream serve                 # run a consumer (and its sidecar on :8000)
    bales-stream serve --demo          # ... and send a few demo requests once ready
    bales-stream send --random 128     # one request with 128 random floats; prints the reply
    bales-stream send --input '[0.1, 0.2, ...]' --priority 0
    bales-stream info                  # per priority: length, lag, pending; consumers
    bales-stream config                # effective settings, secrets masked
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import sys
from typing import Any

import redis

from .logs import configure_logging
from .settings import Settings, SettingsError, load_settings


def _client(settings: Settings) -> Any:
    from bales_producer import Client

    keys = settings.keys
    return Client(
        settings.redis_url.get_secret_value(),
        prefix=keys.prefix,
        queue=keys.queue,
        priority_levels=keys.priority_levels,
    )


def cmd_serve(settings: Settings, args: argparse.Namespace) -> int:
    """Run the service until SIGTERM/SIGINT."""
    from .service import run_service

    asyncio.run(run_service(settings, demo=args.demo))
    return 0


def cmd_send(settings: Settings, args: argparse.Namespace) -> int:
    """Send one request and print its reply as JSON (exit 1 on an error reply)."""
    from bales_producer import ReplyError

    values = (
        json.loads(args.input)
        if args.input
        else [random.uniform(-1, 1) for _ in range(args.random)]
    )
    with _client(settings) as client:
        try:
            reply = client.infer(
                args.model_id or settings.default_model_id,
                values,
                priority=args.priority,
                timeout_s=args.timeout_s,
            )
        except ReplyError as exc:
            print(json.dumps(exc.reply, indent=2))
            return 1
    print(json.dumps(reply, indent=2))
    return 0


def cmd_info(settings: Settings, args: argparse.Namespace) -> int:
    """Print per-priority depth and the group's consumers."""
    keys = settings.keys
    r = redis.Redis.from_url(settings.redis_url.get_secret_value(), decode_responses=True)
    print(f"{'priority':<9}{'stream':<28}{'length':>8}{'lag':>8}{'pending':>9}")
    consumers: dict[str, dict[str, Any]] = {}
    for priority, stream in enumerate(keys.streams):
        length = r.xlen(stream)
        group = next((g for g in _groups(r, stream) if g["name"] == settings.consumer_group), None)
        lag = "-" if group is None or group.get("lag") is None else group["lag"]
        pending = 0 if group is None else group["pending"]
        print(f"p{priority:<8}{stream:<28}{length:>8}{lag!s:>8}{pending:>9}")
        if group is not None:
            for consumer in r.xinfo_consumers(stream, settings.consumer_group):
                entry = consumers.setdefault(consumer["name"], {"pending": 0, "idle": None})
                entry["pending"] += consumer["pending"]
                idle = consumer["idle"]
                entry["idle"] = idle if entry["idle"] is None else min(entry["idle"], idle)
    print(f"\nconsumers in group {settings.consumer_group!r}: {len(consumers)}")
    for name, entry in sorted(consumers.items()):
        print(f"  {name:<40} pending {entry['pending']:>6}  idle {entry['idle']} ms")
    return 0


def _groups(r: redis.Redis, stream: str) -> list[dict[str, Any]]:
    try:
        return r.xinfo_groups(stream)  # type: ignore[return-value]
    except redis.ResponseError:
        return []  # the stream does not exist yet


def cmd_config(settings: Settings, args: argparse.Namespace) -> int:
    """Print the effective settings (secrets masked)."""
    print(json.dumps(settings.public_view(), indent=2))
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``bales-stream``."""
    parser = argparse.ArgumentParser(
        prog="bales-stream",
        description="Queue-native PyTorch inference from Redis Streams. "
        "Settings come from environment variables (see README).",
        epilog=__doc__.split("Examples::", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="run a consumer and its HTTP sidecar")
    serve.add_argument("--demo", action="store_true", help="send demo requests once ready")
    serve.set_defaults(func=cmd_serve)
    send = sub.add_parser("send", help="send one request and print the reply")
    source = send.add_mutually_exclusive_group()
    source.add_argument("--input", help="the input as a JSON array, e.g. '[0.1, 0.2]'")
    source.add_argument(
        "--random",
        type=int,
        default=128,
        metavar="N",
        help="N random floats in [-1, 1] (default 128)",
    )
    send.add_argument("--model-id", help="model to use (default: DEFAULT_MODEL_ID)")
    send.add_argument("--priority", type=int, default=1, help="0 is highest (default 1)")
    send.add_argument("--timeout-s", type=float, default=5.0, help="deadline (default 5)")
    send.set_defaults(func=cmd_send)
    info = sub.add_parser("info", help="queue depth per priority and the group's consumers")
    info.set_defaults(func=cmd_info)
    config = sub.add_parser("config", help="print the effective settings, secrets masked")
    config.set_defaults(func=cmd_config)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``bales-stream`` console script."""
    args = build_parser().parse_args(argv)
    try:
        settings = load_settings()
    except SettingsError as exc:
        print(f"bales-stream: {exc}", file=sys.stderr)
        return 2
    configure_logging(settings.log_level)
    try:
        return int(args.func(settings, args))
    except redis.ConnectionError as exc:
        print(
            f"bales-stream: cannot reach Redis at {settings.redis_url_masked}: {exc}",
            file=sys.stderr,
        )
        return 1
    except (ValueError, TypeError) as exc:
        print(f"bales-stream: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
