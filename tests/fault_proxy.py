"""A bad server for the openai backend: a local OpenAI-compatible model server and a proxy in front
of it that injects faults, both on 127.0.0.1.

`ModelServer` answers /v1/chat/completions and /v1/completions from a real backend's `generate`
(the transformers backend on a local model), one request at a time, and records every answer it
produced by the request body it answered.

`FaultProxy` forwards requests to it and, for a seeded share of them, does something else
instead, each logged with the request and which attempt of that request it was:

    http_500, http_503   a 500 / 503 with a short body, not forwarded
    timeout              holds the request past the client's timeout, then closes; not forwarded
    reset                closes the connection with a TCP reset after reading the request
    truncated            forwards, then sends only half the body its Content-Length announces
    invalid_json         forwards, then answers 200 with the JSON cut in half
    empty_choices        forwards, then answers 200 with ``{"choices": []}``
    stall                forwards, then trickles the answer so slowly it outlasts the timeout

and, not a fault, `slow`: forwards and trickles the answer within the timeout. Whether an attempt
is faulted is drawn from ``Random(seed, request body, attempt)``, so the same attempts are faulted
however requests interleave; the kinds are dealt in turn, so every kind comes up. An answer the
real server takes longer than the client's timeout to give is logged too: the client meets a
timeout there as well (`seen`).
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import hashlib
import http.server
import json
import queue
import random
import socket
import struct
import threading
from collections import Counter

FAULTS = ("http_500", "http_503", "timeout", "reset", "truncated", "invalid_json", "empty_choices", "stall")


def body_key(body: bytes) -> str:
    return hashlib.sha256(body).hexdigest()


class ModelServer:
    """An OpenAI-compatible server answering from `llm.generate`; the requests waiting when the
    model is free are generated together (as a serving engine batches them)."""

    def __init__(self, llm):
        self.llm, self.answers = llm, {}
        self.queue: queue.Queue = queue.Queue()
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self):
                raw = self.rfile.read(int(self.headers["Content-Length"]))
                body = json.loads(raw)
                chat = self.path.endswith("/chat/completions")
                request = body.pop("messages") if chat else body.pop("prompt")
                body.pop("model", None)
                done = concurrent.futures.Future()
                server.queue.put((request, body, done))
                c = done.result()
                server.answers[body_key(raw)] = c.text
                choice = {"message": {"role": "assistant", "content": c.text}} if chat else {"text": c.text}
                data = json.dumps({"choices": [{**choice, "index": 0, "finish_reason": c.finish_reason}],
                                   "usage": {"prompt_tokens": c.prompt_tokens,
                                             "completion_tokens": c.completion_tokens}}).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                try:
                    self.wfile.write(data)
                except OSError:          # the proxy gave up on this answer (a timeout fault)
                    pass

            def log_message(self, *a):
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.httpd.server_port
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()
        threading.Thread(target=self._generate, daemon=True).start()

    def _generate(self) -> None:
        while True:
            batch = [self.queue.get()]
            while not self.queue.empty():
                batch.append(self.queue.get())
            try:
                out = self.llm.generate([r for r, _, _ in batch], [p for _, p, _ in batch])
            except Exception as e:     # a bad request fails its batch, as a server would answer 500
                for _, _, done in batch:
                    done.set_exception(e)
                continue
            for (_, _, done), c in zip(batch, out):
                done.set_result(c)

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


class FaultProxy:
    """Forwards to 127.0.0.1:`upstream`, injecting a fault into `rate` of the requests (kinds in
    equal shares) and trickling another `slow` share; `log` holds one entry per request."""

    def __init__(self, upstream: int, *, rate: float = 0.2, slow: float = 0.05, seed: int = 0,
                 client_timeout: float = 2.0, kinds: tuple[str, ...] = FAULTS):
        self.upstream, self.rate, self.slow, self.seed = upstream, rate, slow, seed
        self.client_timeout, self.kinds = client_timeout, kinds
        self.log: list[dict] = []
        self._seen: Counter = Counter()
        self._injected = 0
        self.loop = asyncio.new_event_loop()
        ready = threading.Event()
        threading.Thread(target=self._serve, args=(ready,), daemon=True).start()
        ready.wait()

    def _serve(self, ready: threading.Event) -> None:
        asyncio.set_event_loop(self.loop)
        self.server = self.loop.run_until_complete(asyncio.start_server(self._client, "127.0.0.1", 0))
        self.port = self.server.sockets[0].getsockname()[1]
        ready.set()
        self.loop.run_forever()

    def close(self) -> None:
        async def stop():
            self.server.close()
            tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
        asyncio.run_coroutine_threadsafe(stop(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)

    def seen(self, entry: dict) -> str:
        """What the client met: the injected fault, or a timeout when the answer (the server's
        or the fault's) took longer than the client waits."""
        return "timeout" if entry["seconds"] >= self.client_timeout else entry["fault"]

    def faults(self) -> Counter:
        """Attempts the client could not use, by what it met."""
        return Counter(s for s in map(self.seen, self.log) if s not in ("ok", "slow"))

    def _decide(self, key: str, attempt: int) -> str:
        roll = random.Random(f"{self.seed}:{key}:{attempt}").random()
        if roll < self.rate:
            self._injected += 1
            return self.kinds[(self._injected - 1) % len(self.kinds)]
        if roll < self.rate + self.slow:
            return "slow"
        return "ok"

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                try:
                    head = await reader.readuntil(b"\r\n\r\n")
                except (asyncio.IncompleteReadError, ConnectionError):
                    return
                lines = head.decode("latin-1").split("\r\n")
                path = lines[0].split(" ")[1]
                headers = {k.strip().lower(): v.strip() for k, _, v in (x.partition(":") for x in lines[1:] if x)}
                body = await reader.readexactly(int(headers.get("content-length", 0)))
                key = body_key(body)
                attempt = self._seen[key]
                self._seen[key] += 1
                fault = self._decide(key, attempt)
                entry = {"key": key, "attempt": attempt, "fault": fault, "body": body}
                self.log.append(entry)
                t0 = self.loop.time()
                try:
                    more = await self._answer(fault, path, headers, body, writer)
                finally:
                    entry["seconds"] = self.loop.time() - t0
                if not more:
                    return
        except ConnectionError:          # the client went away (it timed out)
            return
        finally:
            writer.close()

    async def _answer(self, fault: str, path: str, headers: dict, body: bytes, writer) -> bool:
        """Answer one request; False when the connection is finished."""
        if fault in ("http_500", "http_503"):
            status = int(fault[-3:])
            return await self._send(writer, status, b'{"error": "injected"}')
        if fault == "timeout":
            await asyncio.sleep(self.client_timeout + 1)
            return False
        if fault == "reset":
            sock = writer.get_extra_info("socket")
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            writer.transport.abort()
            return False
        status, data = await self._forward(path, headers, body)
        if fault == "truncated":
            head = self._head(status, len(data))
            writer.write(head + data[:len(data) // 2])
            await writer.drain()
            return False
        if fault == "invalid_json":
            return await self._send(writer, 200, data[:len(data) // 2])
        if fault == "empty_choices":
            return await self._send(writer, 200, b'{"choices": []}')
        if fault in ("stall", "slow"):
            total = self.client_timeout * 1.5 if fault == "stall" else 0.5
            writer.write(self._head(status, len(data)))
            step = max(1, len(data) // 20)
            for i in range(0, len(data), step):
                writer.write(data[i:i + step])
                await writer.drain()
                await asyncio.sleep(total / 20)
            return True
        return await self._send(writer, status, data)

    @staticmethod
    def _head(status: int, length: int) -> bytes:
        return (f"HTTP/1.1 {status} {'OK' if status == 200 else 'Error'}\r\nContent-Type: application/json\r\n"
                f"Content-Length: {length}\r\n\r\n").encode()

    async def _send(self, writer, status: int, data: bytes) -> bool:
        writer.write(self._head(status, len(data)) + data)
        await writer.drain()
        return True

    async def _forward(self, path: str, headers: dict, body: bytes) -> tuple[int, bytes]:
        reader, writer = await asyncio.open_connection("127.0.0.1", self.upstream)
        writer.write((f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                      f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n").encode() + body)
        await writer.drain()
        raw = await reader.read()
        writer.close()
        head, _, data = raw.partition(b"\r\n\r\n")
        return int(head.split(b" ")[1]), data


#: How the openai backend names what each fault does to an attempt (`OpenAILLM.reasons`); a reset
#: and a cut body both surface as transport errors (httpx's ReadError / RemoteProtocolError).
REASON = {"http_500": "HTTP 500", "http_503": "HTTP 503", "timeout": "timeout", "stall": "timeout",
          "invalid_json": "invalid JSON", "empty_choices": "no choices", "reset": "transport",
          "truncated": "transport"}
TRANSPORT = ("ReadError", "RemoteProtocolError", "WriteError", "ConnectError")


def account(proxy: FaultProxy, backend) -> dict:
    """Both sides' books of one run: what the proxy did and what the openai `backend` counted."""
    faults = proxy.faults()
    proxy_reasons: Counter = Counter()
    for kind, n in faults.items():
        proxy_reasons[REASON[kind]] += n
    client_reasons: Counter = Counter()
    for reason, n in backend.reasons.items():
        client_reasons["transport" if reason in TRANSPORT else reason] += n
    stats = backend.stats
    return {"attempts": len(proxy.log), "injected": dict(Counter(e["fault"] for e in proxy.log)),
            "faults_seen": sum(faults.values()), "requests": stats.requests, "retries": stats.retries,
            "errors": stats.errors, "proxy_reasons": dict(proxy_reasons), "client_reasons": dict(client_reasons),
            "match": (stats.retries + stats.errors == sum(faults.values())
                      and stats.requests + stats.retries == len(proxy.log) and proxy_reasons == client_reasons)}
