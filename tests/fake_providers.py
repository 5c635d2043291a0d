"""A loopback fake of the providers' HTTP APIs the pipeline pays for: ElevenLabs
text-to-speech and Gemini generateContent, answering as the real APIs do, for the real SDKs.
Every answer carries an id of its own (ElevenLabs' `request-id` header, Gemini's
`responseId`), as the real APIs' do, and the server keeps what it answered."""

import json
import select
import socket
import threading
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

AUDIO = b"ID3-fake-mp3-bytes" * 100


class FakeProviders(BaseHTTPRequestHandler):
    """ElevenLabs text-to-speech and Gemini generateContent, as their APIs answer."""

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers["content-length"])))
        self.server.gate.wait()
        if self._caller_gone():
            return  # nothing answered, nothing billed
        with self.server.counting:
            self.server.calls += 1
        if self.path.startswith("/v1/text-to-speech/"):
            self.send_response(200)
            self.send_header("content-type", "audio/mpeg")
            self.send_header("content-length", str(len(AUDIO)))
            self.send_header("character-cost", str(len(body["text"])))
            request_id = f"el-request-{uuid.uuid4()}"
            self.server.tts_request_ids.append(request_id)
            self.send_header("request-id", request_id)
            self.end_headers()
            self.wfile.write(AUDIO)
            return
        if self.path.endswith(":generateContent"):
            answer = json.dumps(
                {
                    "candidates": [{"content": {"role": "model", "parts": [{"text": "A cat."}]}}],
                    "usageMetadata": {
                        "promptTokenCount": 1_000_000,
                        "candidatesTokenCount": 100_000,
                        "thoughtsTokenCount": 300_000,
                        "cachedContentTokenCount": 200_000,
                        "promptTokensDetails": [
                            {"modality": "TEXT", "tokenCount": 700_000},
                            {"modality": "AUDIO", "tokenCount": 300_000},
                        ],
                        "totalTokenCount": 1_400_000,
                    },
                    "modelVersion": "gemini-2.5-flash",
                    "responseId": f"gemini-response-{uuid.uuid4()}",
                }
            ).encode()
            self.send_response(200)
            self.send_header("content-type", "application/json")
            self.send_header("content-length", str(len(answer)))
            self.end_headers()
            self.wfile.write(answer)
            return
        self.send_error(404)

    def _caller_gone(self) -> bool:
        """Whether the caller closed its connection while its call was held (it was killed):
        the request has been read whole, so anything readable now is the end of it."""
        readable, _, _ = select.select([self.connection], [], [], 0)
        return bool(readable) and self.connection.recv(1, socket.MSG_PEEK) == b""

    def log_message(self, *args: object) -> None:
        """Quiet: the test output is for failures."""


class CountingServer(ThreadingHTTPServer):
    request_queue_size = 64  # a worker's calls at once, not the default backlog of 5

    def __init__(self, *args: object) -> None:
        super().__init__(*args)
        self.calls = 0  # requests answered
        self.counting = threading.Lock()
        self.tts_request_ids: list[str] = []  # in the order answered
        # Cleared, every request waits for it to be set again: a provider call in flight.
        self.gate = threading.Event()
        self.gate.set()


@contextmanager
def fake_providers() -> Iterator[CountingServer]:
    server = CountingServer(("127.0.0.1", 0), FakeProviders)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()
