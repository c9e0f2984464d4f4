"""The ``gradient-nb`` command."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import signal
import sys
from collections.abc import Awaitable, Callable
from typing import Any


def _ice_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--stun", help="STUN server, e.g. stun:203.0.113.5:3478 (none by default)")
    p.add_argument("--turn", action="append", default=[],
                   help="TURN server, e.g. turn:203.0.113.5:3478?transport=udp; repeat to give fallbacks "
                        "(e.g. ?transport=tcp, turns:) tried in order when UDP is blocked")
    p.add_argument("--turn-user", help="TURN long-term credential user")
    p.add_argument("--turn-password", help="TURN long-term credential password")


def _ice_from(args: argparse.Namespace):
    from .mesh.ice import IceConfig

    if args.turn and not (args.turn_user and args.turn_password):
        raise SystemExit("error: --turn needs --turn-user and --turn-password")
    return IceConfig(stun=args.stun, turn=args.turn[0] if args.turn else None,
                     turn_fallbacks=tuple(args.turn[1:]), turn_username=args.turn_user,
                     turn_password=args.turn_password)


def _mesh_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--mesh", default="default", help="mesh name (default: %(default)s)")
    p.add_argument("--secret", default=None, help="join secret of the mesh")
    p.add_argument("--name", default=None, help="this peer's display name")
    p.add_argument("--ephemeral", action="store_true", help="use a throwaway identity instead of the user's key")
    _ice_args(p)


async def _until_signalled(main: Callable[[asyncio.Event], Awaitable[Any]]) -> Any:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(sig, stop.set)
    return await main(stop)


def _emit(obj: dict[str, Any]) -> None:
    print(json.dumps(obj), flush=True)


async def _cmd_rendezvous(args: argparse.Namespace) -> int:
    from .mesh.rendezvous import Rendezvous

    async def main(stop: asyncio.Event) -> int:
        async with Rendezvous(args.host, args.port, secret=args.secret) as rv:
            _emit({"event": "rendezvous", "url": rv.url, "port": rv.port})
            await stop.wait()
        return 0

    return await _until_signalled(main)


async def _cmd_peer(args: argparse.Namespace, setup: Callable[[Any], None] | None = None) -> int:
    """``gradient-nb peer``; ``setup(mesh)`` runs once joined (tests add their diag services there)."""
    from .mesh.errors import JoinRefused
    from .mesh.identity import Identity
    from .mesh.peer import join

    if args.threads is not None:
        if args.threads < 1:
            raise SystemExit("error: --threads must be at least 1")
        import torch

        torch.set_num_threads(args.threads)  # before join: the compute probe measures what serving gets

    async def main(stop: asyncio.Event) -> int:
        from .mesh.processes import ParentWatch

        owner = ParentWatch.from_env()  # set when a kernel (or `gradient-nb demo`) started this peer
        if owner is not None:
            owner.install(stop.set)  # its owner ended: leave now
        identity = Identity.generate() if args.ephemeral else Identity.load_or_create()
        try:
            mesh = await join(args.rendezvous, mesh=args.mesh, name=args.name, secret=args.secret,
                              identity=identity, ice=_ice_from(args), heartbeat=args.heartbeat,
                              peer_timeout=args.peer_timeout)
        except JoinRefused as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        server = sampler = None
        try:
            if setup is not None:
                setup(mesh)
            if args.serve:
                from .serve.node import ServingPeer
                from .serve.weights_sync import progress_printer
                from .verify import attach_commitments

                layers = _parse_layers(args.layers)
                # Without the model here, its weights come from the peers that have it (serve/weights_sync.py).
                server = await ServingPeer.open(mesh, None if args.serve == "default" else args.serve,
                                                dtype=args.dtype, quantization=args.quantization, layers=layers,
                                                memory_cap_bytes=_parse_size(args.memory_cap),
                                                on_weights_progress=progress_printer())
                attach_commitments(server)  # a volunteer's outputs are verifiable by default
                from .rl.sampler import attach_sampler

                # Every serving peer is an RL sampler a trainer can sync (echo.sync); --adapter serves a LoRA.
                sampler = attach_sampler(server, adapter=args.adapter)
                await server.start()
            _emit({"event": "joined", "peer_id": mesh.id, "name": mesh.name, "mesh": mesh.mesh_name})
            await stop.wait()
        finally:
            if sampler is not None:
                await sampler.stop()
            if server is not None:
                # An owner that is gone took its other peers with it: no one would take the layers over.
                await server.stop(handover_timeout=0 if owner is not None and owner.gone else 30.0)
            await mesh.leave()
        _emit({"event": "left", "peer_id": mesh.id})
        return 0

    return await _until_signalled(main)


def _parse_layers(text: str | None) -> tuple[int, int] | None:
    if not text:
        return None
    try:
        start, end = (int(x) for x in text.split(":"))
    except ValueError:
        raise SystemExit(f"error: --layers takes START:END, e.g. 0:10, not {text!r}") from None
    return start, end


def _parse_size(text: str | None) -> int | None:
    if not text:
        return None
    units = {"k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}
    t = text.strip().lower().rstrip("ib").rstrip("b") if text[-1:].lower() == "b" else text.strip().lower()
    try:
        if t and t[-1] in units:
            return int(float(t[:-1]) * units[t[-1]])
        return int(t)
    except ValueError:
        raise SystemExit(f"error: not a size: {text!r} (e.g. 2G, 512M)") from None


def _fmt_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return str(n)


def format_peers(snapshot: dict[str, Any]) -> str:
    """A readable table of a mesh snapshot (``Mesh.snapshot()``)."""
    rows = [("name", "id", "device", "TFLOP/s", "free mem", "services", "links")]
    for p in snapshot["peers"]:
        dev = next((d["name"] for d in p["devices"] if d.get("kind") != "cpu"), None) or \
            (p["devices"][0]["name"] if p["devices"] else "?")
        links = [lk for lk in snapshot["links"] if p["id"] in (lk["a"], lk["b"])]
        rows.append((p["name"] + (" *" if p.get("self") else ""), p["id"][:10], dev[:24], f"{p['tflops']:.3f}",
                     _fmt_bytes(p["free_memory_bytes"]), ",".join(s for s in p["services"]
                                                                    if not s.startswith(("dht.", "mesh.", "diag.")))
                     or "-", str(len(links))))
    if any(p.get("user") for p in snapshot["peers"]):  # kernels' users (`mesh status`)
        rows = [(*r, "user" if i == 0 else (snapshot["peers"][i - 1].get("user") or "-")[:10])
                for i, r in enumerate(rows)]
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows]
    for lk in snapshot["links"]:
        rtt = f"{lk['rtt_ms']:.2f} ms" if lk.get("rtt_ms") is not None else "?"
        # direct-tcp, webrtc-direct or webrtc-relay (older peers publish no kind)
        kind = lk.get("kind") or ("webrtc-relay" if lk.get("relayed") else "webrtc-direct")
        lines.append(f"link {lk['a'][:8]} <-> {lk['b'][:8]}  {kind}  {lk.get('type')}  rtt {rtt}")
    return "\n".join(lines)


async def _cmd_mesh_status(args: argparse.Namespace) -> int:
    from .mesh.errors import JoinRefused
    from .mesh.identity import Identity, user_of
    from .mesh.peer import join

    try:
        mesh = await join(args.url, mesh=args.mesh, secret=args.secret, identity=Identity.generate(),
                          name="status", observe=True)
    except JoinRefused as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    try:
        await mesh.wait_synced(timeout=args.timeout)
        snap = mesh.snapshot()
        # A kernel peer's user, from its certificate checked against the user's key (None: no valid one).
        users = {p.id: user_of(p.id, p.extra) for p in mesh.peers()}
        for peer in snap["peers"]:
            peer["user"] = users.get(peer["id"])
    finally:
        await mesh.leave()
    if args.json:
        print(json.dumps(snap, indent=2))
    else:
        print(f"mesh {snap['mesh']!r} at {snap['rendezvous']}: {len(snap['peers'])} peers")
        print(format_peers(snap))
    return 0


async def _cmd_demo(args: argparse.Namespace) -> int:
    from .mesh.demo import run_demo

    return await run_demo(peers=args.peers)


async def _cmd_serve(args: argparse.Namespace) -> int:
    import time

    from .serve.cluster import split_cap, start_local_cluster
    from .serve.sampling import SamplingParams
    from .verify import attach_verification

    layers = [_parse_layers(x) for x in args.layers.split(",")] if args.layers else None
    if layers is not None and len(layers) != args.peers:
        raise SystemExit(f"error: --layers gives {len(layers)} ranges for {args.peers} peers")
    t0 = time.perf_counter()
    # By default each peer offers too little memory for the whole model, so the scheduler must split it.
    cap = None if args.whole_model or layers or args.quantization else \
        split_cap(args.peers, args.model, {"float32": 4.0}.get(args.dtype, 2.0))
    print(f"starting a local mesh: embedded rendezvous, {args.peers} serving peer processes, this entry peer"
          + (f"; each peer offers {cap / 2**20:.0f} MiB, so the model is split" if cap else ""))
    cluster = await start_local_cluster(args.peers, model=args.model, layers=layers, dtype=args.dtype,
                                        quantization=args.quantization, api=args.api, api_port=args.port,
                                        api_key=args.api_key, api_host=args.host, memory_cap_bytes=cap,
                                        peer_args=["--adapter", args.adapter] if args.adapter else None)
    try:
        engine = cluster.engine
        if args.adapter:  # the verifier recomputes with the base weights: an adapted model is not comparable
            print(f"serving with the LoRA adapter {args.adapter}; outputs are not verified")
        else:
            attach_verification(engine)
        names = {p.id: p.name for p in cluster.mesh.peers()}
        print(f"mesh ready in {time.perf_counter() - t0:.1f} s; model {engine.model_name} "
              f"({engine.info.num_layers} layers)")
        alloc = cluster.allocation()
        for i, pipe in enumerate(alloc.pipelines):
            print(f"allocation, pipeline {i + 1}: " + "  ".join(
                f"{names.get(s.peer_id, s.peer_id[:8])}[{s.start}:{s.end}]" for s in pipe))
        chain = engine.current_route()
        print("route: entry -> " + " -> ".join(f"{names.get(s.peer_id, s.peer_id[:8])}[{s.start}:{s.end}]"
                                              for s in chain))
        messages = [{"role": "user", "content": args.prompt}]
        params = SamplingParams(temperature=0.0, max_tokens=args.max_tokens)
        ids = engine.encode(messages)
        start = time.perf_counter()
        first = None
        out: list[int] = []
        print(f"\n> {args.prompt}\n", flush=True)
        async for tok in engine.generate(ids, params):
            first = first or time.perf_counter() - start
            out.append(tok)
            print(engine.tokenizer.decode([tok], skip_special_tokens=True), end="", flush=True)
        elapsed = time.perf_counter() - start
        print(f"\n\n{len(out)} tokens in {elapsed:.2f} s: {len(out) / elapsed:.1f} tokens/s, "
              f"first token after {1000 * (first or 0):.0f} ms")
        if len(out) > 1:
            _print_stage_shares(engine, chain, names, (elapsed - (first or 0)) / (len(out) - 1))
        if args.api:
            print(f"OpenAI-compatible API at {cluster.api.url} (Ctrl-C to stop)", flush=True)

            async def wait(stop: asyncio.Event) -> None:
                await stop.wait()

            await _until_signalled(wait)
    finally:
        await cluster.stop()
    return 0


def _print_stage_shares(engine: Any, chain: list[Any], names: dict[str, str], token_s: float) -> None:
    """Each stage's share of a decoded token's time (its reported compute), and the rest: messages."""
    way = "stage to stage" if engine.forwards(chain) else "through the entry (star)"
    print(f"a token's {1000 * token_s:.1f} ms, {way}:")
    spent = 0.0
    for s in chain:
        ms = engine.stage_compute_ms.get((s.peer_id, s.start, s.end), 0.0)
        spent += ms
        print(f"  {names.get(s.peer_id, s.peer_id[:8])}[{s.start}:{s.end}]  {ms:6.1f} ms  "
              f"{100 * ms / (1000 * token_s):4.0f}%")
    rest = max(0.0, 1000 * token_s - spent)
    print(f"  messages and sampling  {rest:6.1f} ms  {100 * rest / (1000 * token_s):4.0f}%")


async def _cmd_chat(args: argparse.Namespace) -> int:
    import aiohttp

    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    history: list[dict[str, str]] = []
    async with aiohttp.ClientSession(headers=headers) as http:
        model = args.model
        if model is None:
            async with http.get(f"{args.url}/models", timeout=aiohttp.ClientTimeout(total=10)) as r:
                body = await r.json()
                if r.status != 200:
                    print(f"error: {body.get('error', {}).get('message', body)}", file=sys.stderr)
                    return 2
                model = body["data"][0]["id"]
        prompts = [args.message] if args.message else None
        while True:
            if prompts is not None:
                if not prompts:
                    return 0
                text = prompts.pop()
            else:
                try:
                    text = await asyncio.to_thread(input, "you> ")
                except EOFError:
                    return 0
            history.append({"role": "user", "content": text})
            req = {"model": model, "messages": history, "stream": True, "max_tokens": args.max_tokens,
                   "temperature": args.temperature}
            answer = []
            async with http.post(f"{args.url}/chat/completions", json=req,
                                 timeout=aiohttp.ClientTimeout(total=600)) as r:
                if r.status != 200:
                    print(f"error: {(await r.json()).get('error', {}).get('message')}", file=sys.stderr)
                    return 2
                async for raw in r.content:
                    line = raw.decode().strip()
                    if not line.startswith("data:") or line == "data: [DONE]":
                        continue
                    delta = json.loads(line[5:])["choices"][0]["delta"].get("content") or ""
                    answer.append(delta)
                    print(delta, end="", flush=True)
            print()
            history.append({"role": "assistant", "content": "".join(answer)})


async def _cmd_agent(args: argparse.Namespace) -> int:
    from .agents.agent import run_volunteer

    ice = _ice_from(args)
    return await _until_signalled(lambda stop: run_volunteer(args, stop, _emit, ice=ice))


async def _cmd_echo_train(args: argparse.Namespace) -> int:
    from pathlib import Path

    from .rl.headless import train_headless
    from .rl.trainer import EchoConfig

    cfg = EchoConfig.from_yaml(Path(args.config).read_text())
    state = await train_headless(cfg, peers=args.peers, emit=_emit, rendezvous=args.rendezvous,
                                 mesh_name=args.mesh, secret=args.secret)
    return 0 if state.status == "done" else 1


def _bench(args: argparse.Namespace) -> int:
    import importlib

    module = importlib.import_module(f"gradient_nb.bench.{args.what}")
    return int(module.main(args.rest) or 0)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gradient-nb", description="Decentralized AI from a notebook.")
    parser.add_argument("-v", "--verbose", action="count", default=0)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("rendezvous", help="run the introducer for any number of named meshes")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8765)
    p.add_argument("--secret", default=None, help="join secret required from every peer")
    p.set_defaults(func=_cmd_rendezvous)

    p = sub.add_parser("peer", help="run a headless peer (what a volunteer machine runs)")
    p.add_argument("--rendezvous", required=True, help="rendezvous URL, e.g. ws://host:8765")
    p.add_argument("--heartbeat", type=float, default=2.0, help="seconds between heartbeats")
    p.add_argument("--peer-timeout", type=float, default=10.0, help="seconds of silence before a peer is gone")
    p.add_argument("--serve", metavar="MODEL", help="serve layers of MODEL ('default' = the bundled model); "
                   "without a copy here, the layers assigned are fetched from the peers that serve it")
    p.add_argument("--layers", help="serve exactly these layers, START:END (default: the coordinator decides)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--quantization", choices=["int8", "nf4"], help="quantize this peer's layers")
    p.add_argument("--memory-cap", help="offer at most this much memory, e.g. 2G")
    p.add_argument("--adapter", metavar="PATH", help="serve with this LoRA adapter (peft folder) merged in")
    p.add_argument("--threads", type=int, help="CPU threads for this peer's model work (default: torch's, all "
                   "cores); leave cores to the machine's owner, or split them between peers on one host")
    _mesh_args(p)
    p.set_defaults(func=_cmd_peer)

    p = sub.add_parser("mesh", help="inspect a mesh")
    msub = p.add_subparsers(dest="mesh_command", required=True)
    s = msub.add_parser("status", help="print the peers and links of a mesh")
    s.add_argument("url")
    s.add_argument("--mesh", default="default")
    s.add_argument("--secret", default=None)
    s.add_argument("--timeout", type=float, default=10.0)
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=_cmd_mesh_status)

    p = sub.add_parser("demo", help="a local mesh of peer processes exchanging calls and state, with a report")
    p.add_argument("--peers", type=int, default=3)
    p.set_defaults(func=_cmd_demo)

    p = sub.add_parser("serve", help="serve the bundled model on a local mesh of peer processes, ask it a "
                                     "question and print the allocation, the route, the answer and the speed")
    p.add_argument("--peers", type=int, default=3)
    p.add_argument("--model", default=None, help="model name or local folder (default: the bundled model)")
    p.add_argument("--layers", help="fixed ranges, one per peer, e.g. 0:4,4:26,26:30 (default: the scheduler)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--quantization", choices=["int8", "nf4"])
    p.add_argument("--prompt", default="What is the capital of France?")
    p.add_argument("--max-tokens", type=int, default=48)
    p.add_argument("--api", action="store_true", help="keep serving an OpenAI-compatible API afterwards")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--host", default="127.0.0.1", help="address the API listens on (0.0.0.0: all)")
    p.add_argument("--api-key", default=None, help="bearer token the API requires")
    p.add_argument("--whole-model", action="store_true",
                   help="let each peer offer all its memory (equal peers then each hold the whole model) "
                        "instead of capping them so that the model is split")
    p.add_argument("--adapter", metavar="PATH", help="a LoRA adapter (peft folder, e.g. saved by echo train) "
                   "that every serving peer merges into its layers")
    p.set_defaults(func=_cmd_serve)

    p = sub.add_parser("echo", help="RL post-training (GRPO over LoRA) with samplers on a local mesh")
    esub = p.add_subparsers(dest="echo_command", required=True)
    e = esub.add_parser("train", help="train as CONFIG.yaml says (the keys of %%%%echo train), print metrics")
    e.add_argument("config", help="YAML file: task, mode, steps, num_generations, learning_rate, ...")
    e.add_argument("--peers", type=int, default=2, help="sampler processes for sequential/async (default 2); "
                   "with --rendezvous: how many serving peers of the mesh to wait for")
    e.add_argument("--rendezvous", default=None, help="train with the serving peers of this mesh (volunteers' "
                   "'gradient-nb peer --serve') instead of starting sampler processes")
    e.add_argument("--mesh", default="default", help="mesh name, with --rendezvous (default: %(default)s)")
    e.add_argument("--secret", default=None, help="join secret of the mesh, with --rendezvous")
    e.set_defaults(func=_cmd_echo_train)

    p = sub.add_parser("chat", help="chat with a served model through its OpenAI-compatible API")
    p.add_argument("--url", default="http://127.0.0.1:8000/v1")
    p.add_argument("--api-key", default=None)
    p.add_argument("--model", default=None)
    p.add_argument("--message", "-m", help="send one message and exit")
    p.add_argument("--max-tokens", type=int, default=256)
    p.add_argument("--temperature", type=float, default=0.0)
    p.set_defaults(func=_cmd_chat)

    p = sub.add_parser("agent", help="run a volunteer agent: host MCP tools for the mesh, publish its capabilities")
    p.add_argument("--rendezvous", required=True, help="rendezvous URL, e.g. ws://host:8765")
    p.add_argument("--tools", default="builtin", help="module whose `server` is an MCPServer (default: builtin: "
                   "calculate, convert_units)")
    p.add_argument("--mcp", action="append", default=[], metavar="NAME=COMMAND|URL",
                   help="also host a user's stdio (command line) or streamable-HTTP (URL) MCP server")
    p.add_argument("--skill", action="append", default=[], metavar="NAME=DESCRIPTION")
    p.add_argument("--capacity", type=int, default=1, help="concurrent tasks (default: %(default)s)")
    p.add_argument("--llm", help="OpenAI-compatible base URL of the model the agent answers with (default: no "
                   "model; tasks are routed straight to the tools)")
    p.add_argument("--llm-model", default="", help="model name at --llm")
    p.add_argument("--llm-key", default=None, help="API key for --llm")
    p.add_argument("--heartbeat", type=float, default=2.0)
    p.add_argument("--peer-timeout", type=float, default=10.0)
    _mesh_args(p)
    p.set_defaults(func=_cmd_agent)

    p = sub.add_parser("bench", help="benchmarks that print JSON")
    p.add_argument("what", choices=["transport", "nat", "serve", "verify", "agents", "echo", "scale", "memory",
                                      "market", "collab"])
    p.add_argument("rest", nargs=argparse.REMAINDER)
    p.set_defaults(func=_bench)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING - 10 * args.verbose,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    result = args.func(args)
    if asyncio.iscoroutine(result):
        try:
            result = asyncio.run(result)
        except KeyboardInterrupt:
            return 130
    return int(result or 0)


if __name__ == "__main__":
    sys.exit(main())
