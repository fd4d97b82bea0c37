"""Running a `tinylm serve` app: in the main thread beside the engine, or in a background thread.

`serve_in_main_thread` is what the `tinylm serve` command runs; `BackgroundServer` and `free_port`
start an app inside another program (tests, benchmarks, notebooks) and stop it when done.
"""

from __future__ import annotations

import threading
import time


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that is free on `host` right now (tests, benchmarks)."""
    import socket

    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


class BackgroundServer:
    """Run an app with uvicorn in a thread (tests, benchmarks, notebooks)."""

    def __init__(self, app, host: str = "127.0.0.1", port: int = 0) -> None:
        import uvicorn

        port = port or free_port(host)
        self.host, self.port = host, port
        self.server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def __enter__(self) -> BackgroundServer:
        self.thread.start()
        deadline = time.time() + 30
        while not self.server.started:
            if time.time() > deadline or not self.thread.is_alive():
                raise RuntimeError("server did not start")
            time.sleep(0.05)
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)



def serve_in_main_thread(engine, server) -> int:
    """HTTP (uvicorn `server`) in a thread, the model (`engine.run`) in this, the main thread, which
    decodes ~1.7x faster there (Engine.run says why). Ctrl-C / SIGTERM / the server stopping (e.g.
    port in use) end both. Returns the exit code: 0, or 1 when the server failed to start."""
    import signal

    def http() -> None:
        try:
            server.run()
        except SystemExit:  # uvicorn's way to give up when it cannot start (it logged why)
            pass
        finally:
            engine.stop()

    thread = threading.Thread(target=http, name="tinylm-http", daemon=True)
    previous = signal.signal(signal.SIGTERM, signal.default_int_handler)  # SIGTERM: graceful, like Ctrl-C
    try:
        engine.run(on_start=thread.start)
    except KeyboardInterrupt:
        pass
    finally:
        signal.signal(signal.SIGTERM, previous)
        engine.stop()
        server.should_exit = True
        if thread.is_alive():
            thread.join(timeout=10)
    return 0 if server.started else 1

