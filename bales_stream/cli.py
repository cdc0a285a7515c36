# PYTHON_ARGCOMPLETE_OK
"""The ``bales-stream`` command: serve, send, info, check, reload, config.

Examples::

    bales-stream serve                 # run a consumer (and its sidecar on :8000)
    bales-stream serve --demo          # ... and send a few demo requests once ready
    bales-stream send --random 128     # one request with 128 random floats; prints the reply
    bales-stream send --input '[0.1, 0.2, ...]' --priority 0
    bales-stream info                  # per shard and priority: length, lag, pending, oldest age
    bales-stream info --watch 2        # ... refreshed every 2 s (Ctrl-C to stop)
    bales-stream info --json           # the same figures as one JSON document
    bales-stream check                 # exit 0 if this host's consumer is ready, else 1
    bales-stream check --json          # ... and say why as JSON
    bales-stream reload stub_v1 stub_v2.pt   # hot-reload a model fleet-wide (uses SIDECAR_TOKEN)
    bales-stream config                # effective settings, secrets masked
    eval "$(register-python-argcomplete bales-stream)"   # shell completion (bash, zsh)
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import signal
import sys
import time
import urllib.error
import urllib.request
from typing import Any

import argcomplete

from . import __version__
from .errors import StartupError
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
        cluster=settings.cluster_mode,
        shards=keys.shards,
    )


def cmd_serve(settings: Settings, args: argparse.Namespace) -> int:
    """Run the service until SIGTERM/SIGINT."""
    from .service import serve

    return serve(settings, demo=args.demo)


class UsageError(Exception):
    """A command line the user can fix (exit status 2; the message says what to write)."""


def _input_values(args: argparse.Namespace) -> list[Any]:
    """``--input`` as a JSON array, or ``--random`` floats."""
    if not args.input:
        return [random.uniform(-1, 1) for _ in range(args.random)]
    expected = "--input takes a JSON array of numbers, e.g. --input '[0.1, 0.2]'"
    try:
        values = json.loads(args.input)
    except json.JSONDecodeError:
        raise UsageError(f"{expected}; {args.input[:40]!r} is not JSON") from None
    if not isinstance(values, list):
        raise UsageError(f"{expected}; got a JSON {type(values).__name__}")
    return values


def cmd_send(settings: Settings, args: argparse.Namespace) -> int:
    """Send one request and print its reply as JSON (exit 1 on an error reply or none)."""
    from bales_producer import Overloaded, ReplyError, RequestTimeout

    values = _input_values(args)
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
        except RequestTimeout:
            _error(
                f"no reply within {args.timeout_s:g} s: is a consumer running? "
                "('bales-stream info' lists the group's consumers; --timeout-s waits longer)"
            )
            return 1
        except Overloaded as exc:
            _error(f"{exc} (the queue is over its backlog bound: retry later)")
            return 1
    print(json.dumps(reply, indent=2))
    return 0


def _error(message: str) -> None:
    """One line on stderr, prefixed with the command's name."""
    print(f"bales-stream: {message}", file=sys.stderr)


def cmd_info(settings: Settings, args: argparse.Namespace) -> int:
    """Print per shard and priority depth and the group's consumers (``--json``: as JSON;
    ``--watch``: over and over until SIGINT or SIGTERM)."""
    if args.watch is None:
        report = asyncio.run(queue_report(settings))
        print(json.dumps(report, indent=2) if args.json else format_report(report))
    else:
        asyncio.run(watch_queues(settings, args.watch, as_json=args.json))
    return 0


async def watch_queues(settings: Settings, interval_s: float, *, as_json: bool = False) -> None:
    """Print the queue report every ``interval_s`` until SIGINT or SIGTERM.

    A Redis error is shown in place of the report and the watch goes on (an outage is when
    an operator watches). On a terminal each report replaces the last; into a pipe or a
    file the reports follow each other, with no screen-control codes (``--json``: one JSON
    document per line). The signals are handled by the event loop (not as
    ``KeyboardInterrupt``), so one that lands in the middle of a report, of a Redis call or
    of a pause ends the watch at once instead of being absorbed by a cancelled Redis call."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    stopped = asyncio.create_task(stop.wait())
    try:
        while True:
            frame = asyncio.create_task(queue_report(settings))
            await asyncio.wait([frame, stopped], return_when=asyncio.FIRST_COMPLETED)
            if stop.is_set():
                frame.cancel()
                return
            print(_watch_frame(settings, frame, interval_s, as_json), flush=True)
            await asyncio.wait([stopped], timeout=interval_s)
            if stop.is_set():
                return
    finally:
        stopped.cancel()


def _watch_frame(
    settings: Settings, frame: asyncio.Task[dict[str, Any]], interval_s: float, as_json: bool
) -> str:
    """One refresh of ``info --watch``: the report, or the Redis error in its place."""
    import redis

    error = frame.exception()
    if error is not None and not isinstance(error, redis.RedisError | OSError):
        raise error
    now = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    problem = f"cannot reach Redis at {settings.redis_url_masked}: {error} (retrying)"
    if as_json:
        body = {"error": problem} if error is not None else frame.result()
        return json.dumps({"time": now} | body)
    text = problem if error is not None else format_report(frame.result())
    header = f"{now}  every {interval_s:g} s, Ctrl-C to stop"
    clear = "\x1b[2J\x1b[H" if sys.stdout.isatty() else "\n"
    return f"{clear}{header}\n\n{text}"


async def queue_report(settings: Settings) -> dict[str, Any]:
    """Per shard and priority: length, lag, pending and the age of the oldest waiting
    request (the figures the sidecar's /health and /metrics show); then the group's
    consumers with their pending count (all shards) and idle time. The shape of ``info
    --json`` (docs/operations.md)."""
    from .queues import queue_stats
    from .service import connect
    from .shards import serving_plan, shard_label

    plan = serving_plan(settings.keys, tuple(range(settings.keys.shards)))
    streams = {
        (shard, p): space.stream(p)
        for shard, space in plan.items()
        for p in range(space.priority_levels)
    }
    redis_client = connect(settings.redis_url.get_secret_value(), cluster=settings.cluster_mode)
    try:
        stats = []
        for shard, space in plan.items():
            stats += await queue_stats(redis_client, space, settings.consumer_group, shard)
        names = list(streams.values())
        consumers = await _group_consumers(redis_client, settings, names)
        nodes = {  # the primary holding each stream (the cluster client's slot map)
            name: redis_client.get_node_from_key(name).name
            for name in names
            if settings.cluster_mode
        }
    finally:
        await redis_client.aclose()
    queues = []
    for stat in stats:
        stream = streams[stat.shard, stat.priority]
        queues.append(
            {
                "shard": shard_label(stat.shard),
                "priority": stat.priority,
                "stream": stream,
                "length": stat.length,
                "lag": stat.lag,
                "pending": stat.pending,
                "oldest_age_s": stat.oldest_age_s,
                "node": nodes.get(stream),
            }
        )
    return {
        "group": settings.consumer_group,
        "queues": queues,
        "consumers": [
            {"name": name, "pending": entry["pending"], "idle_ms": entry["idle"]}
            for name, entry in sorted(consumers.items())
        ],
    }


def format_report(report: dict[str, Any]) -> str:
    """``queue_report`` as the table ``info`` prints."""
    cluster = any(q["node"] for q in report["queues"])
    width = max((len(q["stream"]) for q in report["queues"]), default=6) + 2
    lines = [
        f"{'shard':<6}{'priority':<9}{'stream':<{width}}"
        f"{'length':>8}{'lag':>8}{'pending':>9}{'oldest':>10}" + ("  node" if cluster else "")
    ]
    for q in report["queues"]:
        lag = "-" if q["lag"] is None else q["lag"]
        age = "-" if q["oldest_age_s"] is None else f"{q['oldest_age_s']:.1f}s"
        lines.append(
            f"{q['shard']:<6}p{q['priority']:<8}{q['stream']:<{width}}"
            f"{q['length']:>8}{lag!s:>8}{q['pending']:>9}{age:>10}"
            + (f"  {q['node']}" if cluster else "")
        )
    consumers = report["consumers"]
    lines.append(f"\nconsumers in group {report['group']!r}: {len(consumers)}")
    for c in consumers:
        lines.append(f"  {c['name']:<40} pending {c['pending']:>6}  idle {c['idle_ms']} ms")
    return "\n".join(lines)


async def _group_consumers(
    redis_client: Any, settings: Settings, streams: list[str]
) -> dict[str, dict[str, Any]]:
    """Consumer name -> pending entries (all streams) and idle time (the least)."""
    from redis import ResponseError

    consumers: dict[str, dict[str, Any]] = {}
    for stream in streams:
        try:
            found = await redis_client.xinfo_consumers(stream, settings.consumer_group)
        except ResponseError:
            continue  # no stream or no group yet
        for consumer in found:
            name = consumer["name"]
            name = name.decode() if isinstance(name, bytes) else name
            entry = consumers.setdefault(name, {"pending": 0, "idle": None})
            entry["pending"] += consumer["pending"]
            idle = consumer["idle"]
            entry["idle"] = idle if entry["idle"] is None else min(entry["idle"], idle)
    return consumers


def cmd_check(settings: Settings, args: argparse.Namespace) -> int:
    """Exit 0 if the sidecar says ready, else 1 (a container health check: no curl needed).
    ``--json`` prints ``{"ready", "url", "status", "reasons"}`` on stdout either way."""
    url = args.url or f"http://127.0.0.1:{settings.port}/ready"
    result: dict[str, Any] = {"ready": False, "url": url, "status": None, "reasons": []}
    try:
        with urllib.request.urlopen(url, timeout=args.timeout_s) as response:
            result.update(ready=True, status=response.status)
    except urllib.error.HTTPError as exc:
        body = exc.read().decode(errors="replace")
        result.update(status=exc.code, reasons=_reasons(body))
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        result["reasons"] = [f"cannot reach {url}: {reason} (is the consumer running?)"]
    if args.json:
        print(json.dumps(result))
    elif result["ready"]:
        print(f"ready ({result['status']})")
    else:
        status = f" ({result['status']})" if result["status"] else ""
        print(f"not ready{status}: {'; '.join(result['reasons'])}", file=sys.stderr)
    return 0 if result["ready"] else 1


def _reasons(body: str) -> list[str]:
    """The reasons a /ready answer gives (its JSON ``reasons``, else its text)."""
    try:
        reasons = json.loads(body).get("reasons")
    except (ValueError, AttributeError):
        reasons = None
    return [str(r) for r in reasons] if isinstance(reasons, list) else [body.strip()[:200]]


def cmd_reload(settings: Settings, args: argparse.Namespace) -> int:
    """Ask a consumer's sidecar to hot-reload a model, fleet-wide; print its answer."""
    base = args.url or f"http://127.0.0.1:{settings.port}"
    request = urllib.request.Request(
        f"{base}/models/{args.model_id}/reload",
        data=json.dumps(
            {"weights_path": args.weights_path} | ({"sha256": args.sha256} if args.sha256 else {})
        ).encode(),
        headers={"Content-Type": "application/json"},
        method="POST",
    )
    if settings.sidecar_token is not None:
        token = settings.sidecar_token.get_secret_value()
        request.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(request, timeout=args.timeout_s) as response:
            print(json.dumps(json.loads(response.read()), indent=2))
            return 0
    except urllib.error.HTTPError as exc:
        print(
            f"reload refused ({exc.code}): {exc.read().decode(errors='replace')}", file=sys.stderr
        )
    except (urllib.error.URLError, OSError) as exc:
        print(f"cannot reach the sidecar at {base}: {exc}", file=sys.stderr)
    return 1


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
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
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
    info.add_argument(
        "--watch",
        type=float,
        nargs="?",
        const=2.0,
        metavar="SECONDS",
        help="refresh every SECONDS (default 2) until Ctrl-C",
    )
    info.add_argument("--json", action="store_true", help="print JSON (see docs/operations.md)")
    info.set_defaults(func=cmd_info)
    check = sub.add_parser("check", help="exit 0 if the local consumer is ready, else 1")
    check.add_argument("--url", help="readiness URL (default http://127.0.0.1:$PORT/ready)")
    check.add_argument("--timeout-s", type=float, default=3.0)
    check.add_argument("--json", action="store_true", help="print the verdict as JSON")
    check.set_defaults(func=cmd_check)
    reload = sub.add_parser("reload", help="hot-reload a model on every consumer")
    reload.add_argument("model_id", help="a served model, e.g. stub_v1")
    reload.add_argument("weights_path", help="file inside WEIGHTS_DIR, e.g. stub_v2.pt")
    reload.add_argument(
        "--sha256", help="the file's sha256 (needed to move a pinned model to another file)"
    )
    reload.add_argument("--url", help="sidecar base URL (default http://127.0.0.1:$PORT)")
    reload.add_argument("--timeout-s", type=float, default=60.0)
    reload.set_defaults(func=cmd_reload)
    config = sub.add_parser("config", help="print the effective settings, secrets masked")
    config.set_defaults(func=cmd_config)
    return parser


def _redis_unreachable(exc: BaseException) -> bool:
    """Whether ``exc`` is redis-py's connection error or timeout (redis-py is imported only
    by the commands that talk to Redis, so ``check`` starts fast)."""
    redis = sys.modules.get("redis")
    return redis is not None and isinstance(exc, redis.ConnectionError | redis.TimeoutError)


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``bales-stream`` console script: every expected failure is one
    line on stderr that says what to do (exit 1: the service or Redis; 2: the command)."""
    parser = build_parser()
    argcomplete.autocomplete(parser)
    args = parser.parse_args(argv)
    try:
        settings = load_settings()
    except SettingsError as exc:
        _error(str(exc))
        return 2
    configure_logging(settings.log_level, settings.log_format, settings.consumer_name)
    try:
        return int(args.func(settings, args))
    except StartupError as exc:
        _error(str(exc))
        return 1
    except (UsageError, ValueError, TypeError) as exc:
        _error(str(exc))
        return 2
    except Exception as exc:
        if not _redis_unreachable(exc):
            raise
        _error(
            f"cannot reach Redis at {settings.redis_url_masked}: {exc} "
            "(is redis-server running there? REDIS_URL says where)"
        )
        return 1
    except KeyboardInterrupt:  # Ctrl-C outside a loop that handles it (e.g. while sending)
        return 130


if __name__ == "__main__":
    sys.exit(main())
